"""Fused log-prob + entropy: Triton kernel (interpreter on CPU), torch twin and C++ op against a float64 reference.

Fresh random inputs every run (the seed is printed on failure). Errors are normwise relative: max|x - ref| /
max|ref| per output (logp, entropy, dhidden, dweight). Run with `-s` to see the largest error per case.
"""

import os
import sys

import torch

# TRITON_INTERPRET must be set before triton is first imported (triton.language's own @jit helpers are decorated
# then). If another module (vllm, say) imported triton first, the Triton tests run in a fresh process instead.
if "triton" in sys.modules:  # already imported: usable here only if it was imported under the interpreter
    from triton.language import standard as _tl_std
    from triton.runtime.interpreter import InterpretedFunction as _Interp

    _INTERP_SAFE = isinstance(_tl_std.sum, _Interp)
else:
    _INTERP_SAFE = True
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton has no CPU driver: never launch outside the interpreter

import subprocess

import pytest

import fast_srt.kernels.logprobs as L
from fast_srt.kernels import fused_logprobs, logprobs_naive, logprobs_chunked, native, select_logprobs_impl

needs_native = pytest.mark.skipif(torch.cuda.is_available() or not native.available(),
                                  reason="C++ CPU op not built (csrc/README.md), or a CUDA run")
TRITON_IN_PROCESS = L.triton is not None and (torch.cuda.is_available() or _INTERP_SAFE)
needs_triton = pytest.mark.skipif(not TRITON_IN_PROCESS, reason="triton missing, or imported before "
                                  "TRITON_INTERPRET=1 (then test_triton_tests_in_fresh_process runs them)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_REL: dict[str, float] = {}


def _inputs(N, H, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)  # logits of order a few units
    targets = torch.randint(0, V, (N,), generator=g)
    g_logp = torch.randn(N, generator=g, dtype=torch.float64)
    g_ent = torch.randn(N, generator=g, dtype=torch.float64)
    return [x.to(DEVICE) for x in (hidden, weight, targets, g_logp, g_ent)]


def _run(fn, hidden, weight, targets, g_logp, g_ent, temperature, dtype):
    h = hidden.detach().to(dtype).clone().requires_grad_()
    w = weight.detach().to(dtype).clone().requires_grad_()
    logp, entropy = fn(h, w, targets, temperature)
    (logp.to(g_logp.dtype) * g_logp + entropy.to(g_ent.dtype) * g_ent).sum().backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


def _compare(name, fn, N, H, V, temperature, dtype, tol):
    seed = int.from_bytes(os.urandom(4), "little")
    hidden, weight, targets, g_logp, g_ent = _inputs(N, H, V, dtype, seed)
    # the reference sees the same (rounded) inputs as the implementation under test
    hidden, weight = hidden.to(dtype).double(), weight.to(dtype).double()
    ref = _run(logprobs_naive, hidden, weight, targets, g_logp, g_ent, temperature, torch.float64)
    out = _run(fn, hidden, weight, targets, g_logp, g_ent, temperature, dtype)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert out[2].dtype == dtype and out[3].dtype == dtype
    worst = 0.0
    for what, a, b in zip(("logp", "entropy", "dhidden", "dweight"), out, ref):
        assert a.shape == b.shape
        rel = ((a.double() - b).abs().max() / b.abs().max()).item()
        worst = max(worst, rel)
        assert rel < tol, f"{name} {what}: rel err {rel:.3g} >= {tol} (N={N} H={H} V={V} T={temperature} seed={seed})"
    key = f"{name}/{str(dtype).replace('torch.', '')}"
    MAX_REL[key] = max(MAX_REL.get(key, 0.0), worst)
    print(f"MAXREL {key} N={N} H={H} V={V} T={temperature}: {worst:.3g}")


# (N, H, V, temperature): odd N and H, vocabularies below, not a multiple of and a multiple of the kernels' BLOCK_V=1024
CASES = [(37, 48, 1031, 0.7), (19, 40, 49152, 1.3), (70, 96, 257, 1.0)]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@needs_triton
@pytest.mark.parametrize("N,H,V,temperature", CASES)
def test_triton_fp32_matches_float64(N, H, V, temperature):
    _compare("triton", fused_logprobs, N, H, V, temperature, torch.float32, TOL[torch.float32])


@needs_triton
def test_triton_bf16_matches_float64():
    _compare("triton", fused_logprobs, 45, 64, 1031, 0.8, torch.bfloat16, TOL[torch.bfloat16])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_many_chunks(monkeypatch, dtype):
    """Several row chunks (the last one short), forward and backward: chunk boundaries lose nothing."""
    monkeypatch.setattr(L, "FUSED_CHUNK_BYTES", 7 * 4 * 1031)  # 7 rows of V = 1031 fp32 logits per chunk
    assert L._fused_chunk_rows(45, 1031) == 7
    _compare("triton", fused_logprobs, 45, 40, 1031, 0.9, dtype, TOL[dtype])


@needs_triton
def test_triton_frozen_head_gets_no_weight_gradient():
    """A frozen head (LoRA): the backward skips dweight and gives dhidden as with a trained head."""
    hidden, weight, targets, g_logp, g_ent = _inputs(29, 40, 1031, torch.float32, seed=5)
    _, _, dh_ref, _ = _run(fused_logprobs, hidden, weight, targets, g_logp, g_ent, 0.9, torch.float32)
    h = hidden.detach().float().clone().requires_grad_()
    w = weight.detach().float().clone()  # no grad
    logp, ent = fused_logprobs(h, w, targets, 0.9)
    (logp.double() * g_logp + ent.double() * g_ent).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad, dh_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["triton", "twin", "native"])
def test_fp32_inputs_stay_fp32_under_autocast(name):
    """The trainer calls the op inside bf16 autocast with the fp32 master head: the logits GEMMs must not be cast
    down to bf16 (a forward with bf16 logits and an fp32 backward would also disagree with each other)."""
    if name == "triton" and not TRITON_IN_PROCESS:
        pytest.skip("triton missing, or imported before TRITON_INTERPRET=1")
    if name == "native" and (torch.cuda.is_available() or not native.available()):
        pytest.skip("C++ CPU op not built, or a CUDA run")
    fn = {"triton": fused_logprobs, "twin": logprobs_chunked, "native": L.logprobs_native}[name]
    hidden, weight, targets, g_logp, g_ent = _inputs(33, 40, 1031, torch.float32, seed=3)
    plain = _run(fn, hidden, weight, targets, g_logp, g_ent, 0.8, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        cast = _run(fn, hidden, weight, targets, g_logp, g_ent, 0.8, torch.float32)
    for a, b in zip(plain, cast):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("N,H,V,temperature", CASES + [(1000, 576, 49152, 0.6)])
def test_twin_fp32_matches_float64(N, H, V, temperature):
    _compare("twin", logprobs_chunked, N, H, V, temperature, torch.float32, TOL[torch.float32])


def test_twin_many_chunks(monkeypatch):
    monkeypatch.setattr(L, "CHUNK_ELEMS", 5 * 1031)  # 5 rows per chunk, last chunk partial
    _compare("twin", logprobs_chunked, 67, 48, 1031, 0.9, torch.float32, TOL[torch.float32])


def test_twin_bf16_matches_float64():
    # bf16 on CPU: the matmul rounds logits to bf16 (no fp32-output mm on CPU), hence the looser tolerance
    _compare("twin", logprobs_chunked, 45, 64, 1031, 0.8, torch.bfloat16, TOL[torch.bfloat16])


@needs_native
@pytest.mark.parametrize("store", [True, False], ids=["stored-logits", "recomputed-logits"])
@pytest.mark.parametrize("N,H,V,temperature", CASES + [(1000, 576, 49152, 0.6)])
def test_native_fp32_matches_float64(N, H, V, temperature, store, monkeypatch):
    """Both backwards: logits kept by the forward ([N, V] under the cap), and recomputed tile by tile (above it)."""
    monkeypatch.setattr(native, "STORE_LOGITS_MAX_BYTES", native.STORE_LOGITS_MAX_BYTES if store else 0)
    _compare("native", L.logprobs_native, N, H, V, temperature, torch.float32, TOL[torch.float32])


@needs_native
def test_native_keeps_logits_for_its_backward_only_under_the_cap_and_reuses_the_buffer(monkeypatch):
    """The forward lends the pooled [N, V] buffer only when a backward follows and it fits the cap; the backward
    gives it back, so the next forward writes into the same memory; a second backward (retain_graph) recomputes
    the logits and gets the same gradients."""
    monkeypatch.setattr(native, "LOGITS_BUFFER", native._LogitsBuffer())
    hidden, weight, targets, _, _ = _inputs(41, 32, 3001, torch.float32, int.from_bytes(os.urandom(4), "little"))
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    logp, ent = L.logprobs_native(h, w, targets, 0.9)
    kept = logp.grad_fn.logits
    assert kept.shape == (41, 3001) and native.LOGITS_BUFFER.idle is None  # lent out
    (logp.sum() + ent.sum()).backward(retain_graph=True)
    first = (h.grad.clone(), w.grad.clone())
    assert native.LOGITS_BUFFER.idle is not None and logp.grad_fn.logits is None  # given back
    h.grad, w.grad = None, None
    (logp.sum() + ent.sum()).backward()  # recomputed: same gradients
    torch.testing.assert_close((h.grad, w.grad), first, rtol=1e-5, atol=1e-6)
    again = L.logprobs_native(h, w, targets, 0.9)[0].grad_fn.logits
    assert again.data_ptr() == kept.data_ptr()  # the same memory, no fresh pages
    monkeypatch.setattr(native, "STORE_LOGITS_MAX_BYTES", 41 * 3001 * 4 - 1)  # one byte short: recomputed
    assert L.logprobs_native(h, w, targets, 1.0)[0].grad_fn.logits is None
    with torch.no_grad():  # a log-prob pass without backward (old, reference) keeps nothing
        monkeypatch.setattr(native, "STORE_LOGITS_MAX_BYTES", 1 << 30)
        assert L.logprobs_native(h, w, targets, 1.0)[0].grad_fn is None


@needs_native
def test_native_matches_twin():
    seed = int.from_bytes(os.urandom(4), "little")
    hidden, weight, targets, g_logp, g_ent = _inputs(53, 72, 3001, torch.float32, seed)
    a = _run(L.logprobs_native, hidden, weight, targets, g_logp, g_ent, 1.1, torch.float32)
    b = _run(logprobs_chunked, hidden, weight, targets, g_logp, g_ent, 1.1, torch.float32)
    for x, y in zip(a, b):
        assert ((x - y).abs().max() / y.abs().max()).item() < 1e-5


@needs_native
def test_native_bf16_falls_back_to_twin():
    _compare("native", L.logprobs_native, 45, 64, 1031, 0.8, torch.bfloat16, TOL[torch.bfloat16])


def test_logp_only_gradient_matches_naive():
    """Entropy unused (its grad is None in backward): the twin must still give the right grads."""
    hidden, weight, targets, g_logp, _ = _inputs(29, 32, 517, torch.float32, int.from_bytes(os.urandom(4), "little"))
    grads = []
    for fn in (logprobs_chunked, logprobs_naive):
        h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
        logp, _ = fn(h, w, targets, 1.0)
        (logp * g_logp.float()).sum().backward()
        grads.append((h.grad, w.grad))
    for x, y in zip(*grads):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5)


def test_entropy_and_logp_are_sane():
    """Uniform logits: logp = -log V and entropy = log V exactly."""
    V = 1031
    hidden = torch.zeros(5, 16, device=DEVICE) + torch.rand(1).item()  # constant rows, never all-zero weights
    weight = torch.ones(V, 16, device=DEVICE) * torch.rand(1).item()
    targets = torch.randint(0, V, (5,), device=DEVICE)
    for fn in (logprobs_chunked, logprobs_naive):
        logp, ent = fn(hidden, weight, targets, 1.0)
        torch.testing.assert_close(logp, torch.full_like(logp, -torch.log(torch.tensor(float(V))).item()))
        torch.testing.assert_close(ent, torch.full_like(ent, torch.log(torch.tensor(float(V))).item()))


@pytest.mark.parametrize(
    "hidden,weight,targets,temperature",
    [
        (torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long), 1.0),  # H mismatch
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long), 1.0),  # N mismatch
        (torch.randn(4, 8), torch.randn(10, 8).double(), torch.zeros(4, dtype=torch.long), 1.0),  # dtype mismatch
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.int32), 1.0),  # targets dtype
        (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), 0.0),  # temperature
        (torch.randn(4, 8, 2), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), 1.0),  # rank
    ],
)
def test_bad_input_raises_value_error(hidden, weight, targets, temperature):
    for fn in (logprobs_chunked, fused_logprobs, logprobs_naive):  # input checks run before any launch
        with pytest.raises(ValueError):
            fn(hidden, weight, targets, temperature)


def test_select_logprobs_impl_chooses_once_per_device():
    assert select_logprobs_impl(torch.device("cuda")) is L.fused_logprobs
    cpu_impl = select_logprobs_impl(torch.device("cpu"))
    expect_native = native.available() and L.NATIVE_ON_CPU
    assert cpu_impl is (L.logprobs_native if expect_native else logprobs_chunked)


def test_import_does_not_shadow_hf_kernels_package():
    """fast_srt.kernels must not be importable as a bare `kernels` (a different PyPI package)."""
    code = (
        "import importlib.util, fast_srt.kernels, pathlib\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "ours = pathlib.Path(fast_srt.kernels.__file__).resolve().parent\n"
        "assert spec is None or pathlib.Path(spec.origin).resolve().parent != ours, spec\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/", env=env)


def test_triton_tests_in_fresh_process():
    """When triton was imported before TRITON_INTERPRET=1 in this process, run this file's tests in a fresh one."""
    if TRITON_IN_PROCESS or L.triton is None:
        pytest.skip("the Triton tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:]
