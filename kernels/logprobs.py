"""Fused log-prob + entropy of sampled tokens from hidden states, without a [N, V] logits buffer.

For hidden [N, H], output projection weight [V, H], targets [N] (int64) and a temperature:
  1. logits z = hidden @ weight.T / temperature in fp32, a chunk of rows at a time;
  2. online logsumexp over the vocabulary: running max m, s = sum exp(z - m), t = sum exp(z - m) * (z - m);
  3. logp = z[target] - lse with lse = m + log s; entropy = log s - t / s (= lse - sum p z);
  4. backward recomputes each chunk's logits: dz = g_logp * (onehot - p) - g_ent * p * (z - mu), mu = sum p z,
     then dhidden = dz @ weight / T and dweight = dz.T @ hidden / T, chunk by chunk.

Three implementations with one signature `(hidden, weight, targets, temperature=1.0) -> (logp, entropy)`:
  - `fused_logprobs`: CUDA. Per chunk of rows one cuBLAS GEMM with fp32 output, then Triton row kernels for the
    softmax statistics (forward) and dz (backward); on CPU the row kernels run only under TRITON_INTERPRET=1,
    for tests. At most FUSED_CHUNK_BYTES of logits live at once.
  - `logprobs_chunked`: torch, chunked over rows; what runs on CPU where the C++ op is not built. Never holds more than
    `CHUNK_ELEMS` logits at once (two such buffers live), in the forward or the backward.
  - `logprobs_naive`: full [N, V] fp32 logits; for tests and benches only.
`select_logprobs_impl(device)` chooses once (see there). Outputs are fp32 [N]; grads come back in the input dtype.
"""

from __future__ import annotations

import torch

from ._utils import FLOAT_DTYPES, _grads_or_zeros, check_logprobs_inputs
from . import native

try:  # triton is absent on some CPU installs; the twin does not need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# Chunk size of `logprobs_chunked` in logits elements: 24 MiB of fp32 per buffer, 128 rows at V = 49152.
CHUNK_ELEMS = 3 << 21

# Where the C++ op is built, CPU runs use it instead of `logprobs_chunked`: it measured faster forward and backward
# on the development CPU (bench/results/logprobs_cpu_2026-11-24.md).
NATIVE_ON_CPU = True

# Triton path (CUDA): the logits of a chunk of rows come from one cuBLAS GEMM with fp32 output, and one Triton
# program per row reads them once (forward: max, logsumexp, entropy, target logit; backward: dz in place or into the
# input dtype), so every GEMM runs on the vendor library and no [N, V] buffer exists: at most FUSED_CHUNK_BYTES of
# fp32 logits at a time (why not an all-Triton backward: bench/results/logprobs_h200_2026-11-30_atomics.md).
FUSED_CHUNK_BYTES = 1 << 30
BLOCK_V = 1024  # columns per loop step of a row program; fixed so the interpreter tests run what the GPU runs


def _fused_chunk_rows(N: int, V: int) -> int:
    return max(1, min(N, FUSED_CHUNK_BYTES // (4 * max(V, 1))))


_MM_DTYPE_OK = True  # torch.ops.aten.mm.dtype (fp32 output from 16-bit inputs) works here; False after a failure


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: fp32 inputs as they are; 16-bit inputs on CUDA through cuBLAS with fp32 output
    (products exact, fp32 accumulation, no rounding of the logits to 16 bits); elsewhere upcast first."""
    global _MM_DTYPE_OK
    with torch.autocast(a.device.type, enabled=False):  # the trainer calls in under bf16 autocast: no downcast
        if a.dtype == torch.float32:
            return torch.mm(a, b)
        if a.is_cuda and _MM_DTYPE_OK:
            try:
                return torch.ops.aten.mm.dtype(a, b, torch.float32)
            except (RuntimeError, NotImplementedError):  # an older torch: upcast (same values, slower)
                _MM_DTYPE_OK = False
        return torch.mm(a.float(), b.float())


if triton is not None:

    @triton.jit
    def _row_stats_kernel(Z, TARGETS, LOGP, ENTROPY, LSE, MU, V, stride_z, inv_temp, BLOCK_V: tl.constexpr):
        # One program per row of a chunk of fp32 logits. Each lane keeps its own running max m, s = sum exp(z - m)
        # and t = sum exp(z - m) * (z - m) over the columns it visits; the lanes are merged at the end.
        row = tl.program_id(0)
        z_row = Z + row.to(tl.int64) * stride_z
        offs = tl.arange(0, BLOCK_V)
        m = tl.full([BLOCK_V], -1e30, dtype=tl.float32)  # finite start: 0 * (m - m_new) stays 0
        s = tl.zeros([BLOCK_V], dtype=tl.float32)
        t = tl.zeros([BLOCK_V], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            ok = cols < V
            z = tl.where(ok, tl.load(z_row + cols, mask=ok, other=0.0) * inv_temp, -1e30)
            m_new = tl.maximum(m, z)
            alpha = tl.exp(m - m_new)
            d = z - m_new
            e = tl.where(ok, tl.exp(d), 0.0)
            t = alpha * (t + s * (m - m_new)) + e * d
            s = alpha * s + e
            m = m_new
        m_all = tl.max(m, 0)
        w = tl.exp(m - m_all)
        s_all = tl.sum(s * w, 0)
        t_all = tl.sum(w * (t + s * (m - m_all)), 0)
        z_tgt = tl.load(z_row + tl.load(TARGETS + row)) * inv_temp
        lse = m_all + tl.log(s_all)
        tl.store(LOGP + row, z_tgt - lse)
        tl.store(ENTROPY + row, tl.log(s_all) - t_all / s_all)
        tl.store(LSE + row, lse)
        tl.store(MU + row, m_all + t_all / s_all)

    @triton.jit
    def _row_grad_kernel(Z, DZ, TARGETS, LSE, MU, GLOGP, GENT, V, stride_z, stride_dz, inv_temp,
                         BLOCK_V: tl.constexpr):
        # dz = (g_logp * (onehot - p) - g_ent * p * (z - mu)) / T, p = exp(z - lse), from a row of fp32 logits;
        # written in DZ's dtype (DZ may be Z itself: each element is read before it is written, by this program).
        row = tl.program_id(0)
        z_row = Z + row.to(tl.int64) * stride_z
        dz_row = DZ + row.to(tl.int64) * stride_dz
        tgt = tl.load(TARGETS + row)
        lse = tl.load(LSE + row)
        mu = tl.load(MU + row)
        g_logp = tl.load(GLOGP + row)
        g_ent = tl.load(GENT + row)
        offs = tl.arange(0, BLOCK_V)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            ok = cols < V
            z = tl.load(z_row + cols, mask=ok, other=0.0) * inv_temp
            p = tl.exp(z - lse)
            dz = -p * (g_logp + g_ent * (z - mu)) + tl.where(cols == tgt, g_logp, 0.0)
            tl.store(dz_row + cols, (dz * inv_temp).to(DZ.dtype.element_ty), mask=ok)


def logprobs_fwd(hidden, weight, targets, inv_temp: float):
    """Triton forward launcher. Returns (logp [N], entropy [N], lse [N], mu [N]), all fp32."""
    N = hidden.shape[0]
    V = weight.shape[0]
    logp, entropy, lse, mu = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(4))
    step = _fused_chunk_rows(N, V)
    wt = weight.t()
    for i in range(0, N, step):
        n = min(step, N - i)
        z = _mm_f32(hidden[i:i + n], wt)  # [n, V] fp32
        _row_stats_kernel[(n,)](z, targets[i:], logp[i:], entropy[i:], lse[i:], mu[i:], V, z.stride(0), inv_temp,
                                BLOCK_V=BLOCK_V)
        del z
    return logp, entropy, lse, mu


def logprobs_bwd(hidden, weight, targets, lse, mu, g_logp, g_ent, inv_temp: float, need_h: bool = True,
                 need_w: bool = True):
    """Triton backward launcher. Returns (dhidden [N, H] or None, dweight [V, H] or None) in the input dtype;
    dweight is summed in fp32 over the chunks (in place for fp32 inputs, the trainer's head; 16-bit inputs need one
    [V, H] fp32 product per chunk beside it). A frozen head (LoRA) needs no dweight: its GEMMs are skipped."""
    N = hidden.shape[0]
    V = weight.shape[0]
    dhidden = torch.empty_like(hidden) if need_h else None
    dweight = None
    step = _fused_chunk_rows(N, V)
    wt = weight.t()
    for i in range(0, N, step):
        n = min(step, N - i)
        h = hidden[i:i + n]
        z = _mm_f32(h, wt)  # [n, V] fp32
        dz = z if hidden.dtype == torch.float32 else torch.empty(n, V, dtype=hidden.dtype, device=z.device)
        _row_grad_kernel[(n,)](z, dz, targets[i:], lse[i:], mu[i:], g_logp[i:], g_ent[i:], V, z.stride(0),
                               dz.stride(0), inv_temp, BLOCK_V=BLOCK_V)
        del z
        if need_h:
            torch.mm(dz, weight, out=dhidden[i:i + n])
        if need_w and dweight is None:
            dweight = _mm_f32(dz.t(), h)  # [V, H] fp32
        elif need_w and dz.dtype == torch.float32:
            dweight.addmm_(dz.t(), h)  # in place: no second [V, H] buffer (in-place ops are never autocast)
        elif need_w:  # 16-bit inputs: the chunk's product in fp32, then summed in fp32
            dweight.add_(_mm_f32(dz.t(), h))
        del dz
    return dhidden, (dweight.to(weight.dtype) if need_w else None)


class LogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        inv_temp = 1.0 / float(temperature)
        logp, entropy, lse, mu = logprobs_fwd(hidden, weight, targets, inv_temp)
        ctx.save_for_backward(hidden, weight, targets, lse, mu)
        ctx.inv_temp = inv_temp
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, mu = ctx.saved_tensors
        g_logp, g_ent = _grads_or_zeros(g_logp, g_ent, lse)
        dhidden, dweight = logprobs_bwd(hidden, weight, targets, lse, mu, g_logp, g_ent, ctx.inv_temp,
                                        *ctx.needs_input_grad[:2])
        return dhidden, dweight, None, None


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Fused log-prob + entropy: cuBLAS GEMMs with fp32 logits, Triton row kernels (see the module docstring).

    hidden [N, H] and weight [V, H] in one of fp32/bf16/fp16 (same dtype), targets [N] int64 in [0, V).
    Returns (logp [N] fp32, entropy [N] fp32); differentiable in hidden and weight. Peak extra memory: one chunk
    of fp32 logits (FUSED_CHUNK_BYTES at most) and four fp32 [N] vectors in the forward; in the backward the
    chunk's logits (fp32 inputs: dz in place), for 16-bit inputs its dz in that dtype and one [V, H] fp32 product
    beside the fp32 dweight accumulator; no dweight at all for a frozen head.
    Never launch on a CPU tensor outside TRITON_INTERPRET=1 (Triton has no CPU driver).
    """
    check_logprobs_inputs(hidden, weight, targets, temperature)
    if triton is None:
        raise ValueError("fused_logprobs needs triton; use logprobs_chunked")
    return LogprobsFunction.apply(hidden, weight, targets, temperature)


# ----------------------------------------------------------------------------------------------------------------
# torch twin


def _ref_chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMS // max(V, 1))


def _chunk_logits(h, weight, inv_temp, out):
    """Scaled logits of one row chunk into `out` (n, V) fp32; the temperature is folded into the (n, H) operand.

    bf16 on CPU: the matmul rounds logits to bf16 (torch has no fp32-output mm on CPU)."""
    if h.dtype == torch.float32:
        return torch.mm(h * inv_temp, weight.t(), out=out)
    return out.copy_(torch.mm(h * inv_temp, weight.t()))


# The two (chunk, V) fp32 buffers are allocated once per call and reused for every chunk: allocating them per
# chunk let glibc's heap grow to ~250 MiB at N = 8192 (dynamic mmap threshold), four times the working set.


class LogprobsRefFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        inv_temp = 1.0 / float(temperature)
        N, V = hidden.shape[0], weight.shape[0]
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        entropy, lse, mu = torch.empty_like(logp), torch.empty_like(logp), torch.empty_like(logp)
        step = min(_ref_chunk_rows(V), max(N, 1))
        zbuf = torch.empty(step, V, dtype=torch.float32, device=hidden.device)  # (chunk, V)
        ebuf = torch.empty_like(zbuf)  # (chunk, V)
        for i in range(0, N, step):
            sl = slice(i, i + step)
            n = min(step, N - i)
            z, e = zbuf[:n], ebuf[:n]
            _chunk_logits(hidden[sl].detach(), weight.detach(), inv_temp, z)
            m = z.amax(dim=1)
            z_tgt = z.gather(1, targets[sl, None]).squeeze(1)
            z.sub_(m[:, None])  # z - m
            torch.exp(z, out=e)
            s = e.sum(dim=1)
            t = z.mul_(e).sum(dim=1)  # sum e * (z - m)
            log_s = torch.log(s)
            lse[sl] = m + log_s
            mu[sl] = m + t / s
            logp[sl] = z_tgt - m - log_s
            entropy[sl] = log_s - t / s
        del zbuf, ebuf
        ctx.save_for_backward(hidden, weight, targets, lse, mu)
        ctx.inv_temp = inv_temp
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, mu = ctx.saved_tensors
        g_logp, g_ent = _grads_or_zeros(g_logp, g_ent, lse)
        inv_temp = ctx.inv_temp
        N = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dhidden = torch.empty_like(hidden) if need_h else None
        # fp32 accumulator for bf16/fp16 weights; for fp32 weights this is the gradient itself
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        V = weight.shape[0]
        step = min(_ref_chunk_rows(V), max(N, 1))
        zbuf = torch.empty(step, V, dtype=torch.float32, device=hidden.device)  # (chunk, V)
        pbuf = torch.empty_like(zbuf)  # (chunk, V)
        hidden, weight = hidden.detach(), weight.detach()
        for i in range(0, N, step):
            sl = slice(i, i + step)
            n = min(step, N - i)
            h = hidden[sl]
            z = _chunk_logits(h, weight, inv_temp, zbuf[:n])  # (n, V)
            p = torch.sub(z, lse[sl, None], out=pbuf[:n]).exp_()  # softmax
            # dz*T = -p * (g_logp + g_ent * (z - mu)) + g_logp * onehot(target); the 1/T goes into the GEMMs
            g_e = g_ent[sl, None]
            z.mul_(-g_e).add_(g_e * mu[sl, None] - g_logp[sl, None]).mul_(p)
            z.scatter_add_(1, targets[sl, None], g_logp[sl, None])
            if need_h:
                dz = z if hidden.dtype == torch.float32 else z.to(hidden.dtype)
                torch.mm(dz, weight, out=dhidden[sl])
                dhidden[sl].mul_(inv_temp)
                del dz
            if need_w:  # fp32 accumulation for every input dtype
                dweight.addmm_(z.t(), h if h.dtype == torch.float32 else h.float(), alpha=inv_temp)
        if need_w and weight.dtype != torch.float32:
            dweight = dweight.to(weight.dtype)
        return dhidden, dweight, None, None


def logprobs_chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Torch twin of `fused_logprobs` (same signature and outputs), chunked over rows.

    hidden [N, H], weight [V, H] (same float dtype), targets [N] int64 -> (logp [N] fp32, entropy [N] fp32).
    At most CHUNK_ELEMS logits (two fp32 buffers of that size) live at once, in forward and backward; the
    backward recomputes each chunk's logits. bf16 on CPU: logits are rounded to bf16 by the matmul.
    """
    check_logprobs_inputs(hidden, weight, targets, temperature)
    return LogprobsRefFunction.apply(hidden, weight, targets, temperature)


def logprobs_naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Full [N, V] fp32 logits, plain autograd. For tests and benches only (memory: several [N, V] fp32 buffers).

    Also accepts float64 inputs (then everything is float64): the tests' reference.
    """
    check_logprobs_inputs(hidden, weight, targets, temperature, FLOAT_DTYPES + (torch.float64,))
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature  # (N, V)
    logz = torch.log_softmax(logits, dim=-1)
    logp = logz.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logz.exp() * logz).sum(dim=-1)
    return logp, entropy


def logprobs_native(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """The C++ CPU op (csrc/logprobs_cpu.cpp) with the twin's signature; raises if the library is not built.

    The op is fp32-only (the dtype it was measured in); bf16/fp16 inputs go to `logprobs_chunked`.
    """
    check_logprobs_inputs(hidden, weight, targets, temperature)
    if hidden.dtype != torch.float32:
        return logprobs_chunked(hidden, weight, targets, temperature)
    if not native.available():
        raise ValueError(f"fast_srt native library not built (expected at {native.LIB_PATH}); see csrc/README.md")
    grad_follows = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return native.NativeLogprobsFunction.apply(hidden, weight, targets, temperature, grad_follows)


def select_logprobs_impl(device: torch.device):
    """Choose the log-prob implementation once, for a device.

    CUDA -> `fused_logprobs` (Triton). CPU -> the C++ op if it is built and NATIVE_ON_CPU,
    else `logprobs_chunked`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if triton is None:
            raise ValueError("CUDA device but triton is not installed")
        return fused_logprobs
    if native.available() and NATIVE_ON_CPU:
        return logprobs_native
    return logprobs_chunked
