"""Fused RMSNorm, SwiGLU and RoPE: the Triton kernels (interpreter on CPU) and the torch twins against a float64
reference of transformers' formulas, forward and backward, fp32 and bf16, ragged sizes, fresh random inputs.

Errors are normwise relative (max|x - ref| / max|ref|). bf16: the fused op rounds once where transformers' ops
round after each step, so its error is at most that of transformers' own bf16 path (x 1.5 + 1e-3). Triton's CPU
interpreter truncates fp32 to bf16 where a GPU rounds to nearest, so a Triton run there may add one bf16 ulp
(at most 2^-7 relative) to that bound."""

import os
import sys

import torch

# TRITON_INTERPRET must be set before triton is first imported; if another module imported triton first, the Triton
# tests run in a fresh process instead (as in test_kernels_logprobs.py).
if "triton" in sys.modules:
    from triton.language import standard as _tl_std
    from triton.runtime.interpreter import InterpretedFunction as _Interp

    _INTERP_SAFE = isinstance(_tl_std.sum, _Interp)
else:
    _INTERP_SAFE = True
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402

import pytest  # noqa: E402

from fast_srt.kernels import fused_ops as F  # noqa: E402

TRITON_IN_PROCESS = F.triton is not None and (torch.cuda.is_available() or _INTERP_SAFE)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "twin"]
BF16_ULP = 2.0 ** -7  # one bf16 ulp, relative: 2^-8 to 2^-7 (7 stored mantissa bits)
SLACK = {"bf16": 1e-3}  # the bf16 bound's additive slack; + BF16_ULP for Triton in the interpreter (the fixture)


@pytest.fixture
def backend(request, monkeypatch):
    if request.param == "triton":
        if not TRITON_IN_PROCESS:
            pytest.skip("triton missing, or imported before TRITON_INTERPRET=1 (test_fused_tests_in_fresh_process)")
        if not torch.cuda.is_available():
            monkeypatch.setitem(SLACK, "bf16", 1e-3 + BF16_ULP)
    else:
        monkeypatch.setattr(F, "uses_triton", lambda x: False)
    return request.param


def rel(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def hf_rms(x, w, eps):
    h = x.to(torch.float32 if x.dtype != torch.float64 else x.dtype)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def hf_rope(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def fwd_bwd(fn, inputs, seed):
    """outputs and input gradients of sum(out * random weights)."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]
    sum((o.double() * w).sum() for o, w in zip(outs, ws)).backward()
    return [o.detach() for o in outs] + [x.grad for x in xs]


def check(fn, ref_fn, inputs64, dtype, seed, tol):
    """fn on dtype inputs against ref_fn in float64; in bf16 also against ref_fn run in bf16 (transformers' path)."""
    got = fwd_bwd(fn, [x.to(dtype) for x in inputs64], seed)
    ref = fwd_bwd(ref_fn, inputs64, seed)
    errs = [rel(a, b) for a, b in zip(got, ref)]
    if dtype == torch.float32:
        assert max(errs) < tol, errs
    else:
        base = [rel(a, b) for a, b in zip(fwd_bwd(ref_fn, [x.to(dtype) for x in inputs64], seed), ref)]
        assert all(e <= 1.5 * b + SLACK["bf16"] for e, b in zip(errs, base)), (errs, base)
        assert max(errs) < tol, errs


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(1, 64), (37, 48), (130, 100)])
def test_rms_norm(backend, dtype, rows, n):
    seed = rows * n
    x, w = randn(rows, n, seed=seed) * 3, randn(n, seed=seed + 1)
    check(lambda a, b: F.rms_norm(a, b, 1e-5), lambda a, b: hf_rms(a, b, 1e-5), [x, w], dtype, seed,
          1e-5 if dtype == torch.float32 else 0.03)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_rms_norm_keeps_fp32_weights_over_bf16_input(backend):
    """A bf16 input with the fp32 master weight gives fp32, as LlamaRMSNorm does."""
    x, w = randn(9, 24, seed=1).bfloat16(), randn(24, seed=2).float()
    y = F.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32
    assert rel(y, hf_rms(x, w, 1e-6).double()) < 1e-6 + SLACK["bf16"] - 1e-3


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7, 33), (3, 1000), (2, 5, 1031)])
def test_silu_mul(backend, dtype, shape):
    seed = sum(shape)
    a, b = randn(*shape, seed=seed) * 4, randn(*shape, seed=seed + 1)
    check(F.silu_mul, lambda x, y: torch.nn.functional.silu(x) * y, [a, b], dtype, seed,
          1e-5 if dtype == torch.float32 else 0.03)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,hq,hk,d", [(1, 2, 1, 8), (13, 9, 3, 64), (29, 6, 2, 24)])
def test_rope(backend, dtype, t, hq, hk, d):
    """q and k as the projections' transposed views, cos/sin in fp32 (as transformers computes them): outputs
    in fp32 like transformers' (q * cos promotes), gradients in q's and k's dtype."""
    seed = t * hq + d
    q = randn(1, t, hq, d, seed=seed).transpose(1, 2)
    k = randn(1, t, hk, d, seed=seed + 1).transpose(1, 2)
    ang = randn(1, t, d // 2, seed=seed + 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def fused(q, k):
        return F.apply_rope(q, k, cos.float(), sin.float())

    def ref(q, k):
        return hf_rope(q, k, cos.to(torch.float64 if q.dtype == torch.float64 else torch.float32),
                       sin.to(torch.float64 if q.dtype == torch.float64 else torch.float32))

    check(fused, ref, [q, k], dtype, seed, 1e-5 if dtype == torch.float32 else 0.01)
    qo, _ = fused(q.to(dtype), k.to(dtype))
    assert qo.dtype == torch.float32 and qo.shape == q.shape


def test_fused_tests_in_fresh_process():
    """When triton was imported before TRITON_INTERPRET=1 in this process, run this file in a fresh one."""
    if TRITON_IN_PROCESS or F.triton is None:
        pytest.skip("the Triton tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:]
