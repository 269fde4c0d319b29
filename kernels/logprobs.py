"""Fused log-prob + entropy of sampled tokens from hidden states, without a [N, V] logits buffer.

For hidden [N, H], output projection weight [V, H], targets [N] (int64) and a temperature:
  1. logits z = hidden @ weight.T / temperature, accumulated in fp32, one vocab tile at a time;
  2. online logsumexp over the tiles: running max m, s = sum exp(z - m), t = sum exp(z - m) * (z - m);
  3. logp = z[target] - lse with lse = m + log s; entropy = log s - t / s (= lse - sum p z);
  4. backward recomputes each tile: dz = g_logp * (onehot - p) - g_ent * p * (z - mu), mu = sum p z,
     then dhidden = dz @ weight / T and dweight = dz.T @ hidden / T, tile by tile.

Three implementations with one signature `(hidden, weight, targets, temperature=1.0) -> (logp, entropy)`:
  - `fused_logprobs`: Triton, forward and backward (CUDA; on CPU only under TRITON_INTERPRET=1, for tests).
  - `logprobs_ref`: the torch twin, chunked over rows; what runs on CPU. Never holds more than
    `REF_CHUNK_ELEMS` logits at once (two such buffers live), in the forward or the backward.
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
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover
    triton = None

# Twin chunk size in logits elements: 3 * 2**21 fp32 = 24 MiB per buffer; forward peak ~55 MiB, backward ~80 MiB above
# its gradients: under 1/16 of the 1.5 GiB [8192, 49152] fp32 logits (128 rows per chunk at V = 49152).
REF_CHUNK_ELEMS = 3 << 21

# Measured speed of the C++ op relative to the twin on the CPU in bench/results/logprobs_cpu_2026-11.md
# (p50 fwd+bwd at N=8192, V=49152, H=576, fp32, side by side in one run). The C++ op is used on CPU only when this
# is at least NATIVE_MIN_SPEEDUP; otherwise the twin runs even where the op is built.
# Quiet machine: fwd+bwd 10.69 s vs 14.10 s = 1.32x (fwd alone 1.42x); with other processes competing for the two
# cores the op's coarse-grained parallelism wins more (1.70x fwd+bwd, 2.12x fwd).
NATIVE_CPU_SPEEDUP = 1.32
NATIVE_MIN_SPEEDUP = 1.3

# Triton tile sizes. BLOCK_N >= 16 for tl.dot. Fixed (no autotune) so the interpreter tests run what the GPU runs.
BLOCK_N = 32
BLOCK_V = 128
BLOCK_H = 64


# ----------------------------------------------------------------------------------------------------------------
# Triton


if triton is not None:

    @triton.jit
    def _logits_tile(HIDDEN, WEIGHT, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv, inv_temp,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                     DOT_FP32: tl.constexpr):
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            x = tl.load(HIDDEN + rows[:, None] * stride_hn + hs[None, :], mask=row_ok[:, None] & h_ok[None, :],
                        other=0.0)
            w = tl.load(WEIGHT + cols[:, None] * stride_wv + hs[None, :], mask=col_ok[:, None] & h_ok[None, :],
                        other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        return acc * inv_temp

    @triton.jit
    def _logprobs_fwd_kernel(HIDDEN, WEIGHT, TARGETS, LOGP, ENTROPY, LSE, MU, N, V, H, stride_hn, stride_wv,
                             inv_temp, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                             PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tgt = tl.load(TARGETS + rows, mask=row_ok, other=0)
        m = tl.full([BLOCK_N], -1e30, dtype=tl.float32)  # finite start: 0 * (m - m_new) stays 0
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        t = tl.zeros([BLOCK_N], dtype=tl.float32)
        z_tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = _logits_tile(HIDDEN, WEIGHT, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv, inv_temp,
                             BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, DOT_FP32)
            z = tl.where(col_ok[None, :], z, -1e30)
            m_new = tl.maximum(m, tl.max(z, 1))
            alpha = tl.exp(m - m_new)
            d = z - m_new[:, None]
            e = tl.where(col_ok[None, :], tl.exp(d), 0.0)
            t = alpha * (t + s * (m - m_new)) + tl.sum(tl.where(col_ok[None, :], e * d, 0.0), 1)
            s = alpha * s + tl.sum(e, 1)
            m = m_new
            z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        lse = m + tl.log(s)
        tl.store(LOGP + rows, z_tgt - lse, mask=row_ok)
        tl.store(ENTROPY + rows, tl.log(s) - t / s, mask=row_ok)
        tl.store(LSE + rows, lse, mask=row_ok)
        tl.store(MU + rows, m + t / s, mask=row_ok)

    @triton.jit
    def _logprobs_bwd_kernel(HIDDEN, WEIGHT, TARGETS, LSE, MU, GLOGP, GENT, DHIDDEN, DWEIGHT, N, V, H, stride_hn,
                             stride_wv, inv_temp, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                             BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
        # One program per (row tile, vocab tile): recompute the logits tile, form dz, and add its contributions to
        # dhidden and dweight (fp32 buffers) with atomics. Nothing of size [N, V] is ever stored.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < N
        col_ok = cols < V
        z = _logits_tile(HIDDEN, WEIGHT, rows, cols, row_ok, col_ok, H, stride_hn, stride_wv, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, DOT_FP32)
        tgt = tl.load(TARGETS + rows, mask=row_ok, other=-1)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        mu = tl.load(MU + rows, mask=row_ok, other=0.0)
        g_logp = tl.load(GLOGP + rows, mask=row_ok, other=0.0)
        g_ent = tl.load(GENT + rows, mask=row_ok, other=0.0)
        ok = row_ok[:, None] & col_ok[None, :]
        p = tl.where(ok, tl.exp(z - lse[:, None]), 0.0)
        dz = -p * (g_logp[:, None] + g_ent[:, None] * (z - mu[:, None]))
        dz += tl.where(cols[None, :] == tgt[:, None], g_logp[:, None], 0.0)
        dz = tl.where(ok, dz, 0.0) * inv_temp
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            x = tl.load(HIDDEN + rows[:, None] * stride_hn + hs[None, :], mask=row_ok[:, None] & h_ok[None, :],
                        other=0.0)
            w = tl.load(WEIGHT + cols[:, None] * stride_wv + hs[None, :], mask=col_ok[:, None] & h_ok[None, :],
                        other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            dzc = dz.to(x.dtype)
            dh = tl.dot(dzc, w, input_precision=PRECISION)  # [BLOCK_N, BLOCK_H]
            tl.atomic_add(DHIDDEN + rows[:, None] * H + hs[None, :], dh, mask=row_ok[:, None] & h_ok[None, :])
            dw = tl.dot(tl.trans(dzc), x, input_precision=PRECISION)  # [BLOCK_V, BLOCK_H]
            tl.atomic_add(DWEIGHT + cols[:, None] * H + hs[None, :], dw, mask=col_ok[:, None] & h_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 dots (tf32 would cost ~1e-3 relative error); bf16/fp16 dots accumulate in fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_fp32(dtype: torch.dtype) -> bool:
    # Triton 3.9's interpreter returns garbage for tl.dot on bf16/fp16 operands (fp32 accumulator); upcast there.
    # Compiled kernels keep 16-bit dots.
    return dtype != torch.float32 and isinstance(_logprobs_fwd_kernel, _InterpretedFunction)


def logprobs_fwd(hidden, weight, targets, inv_temp: float):
    """Triton forward launcher. Returns (logp [N], entropy [N], lse [N], mu [N]), all fp32."""
    N, H = hidden.shape
    V = weight.shape[0]
    logp, entropy, lse, mu = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(4))
    grid = (triton.cdiv(N, BLOCK_N),)
    _logprobs_fwd_kernel[grid](hidden, weight, targets, logp, entropy, lse, mu, N, V, H, hidden.stride(0),
                               weight.stride(0), inv_temp, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H,
                               PRECISION=_precision(hidden.dtype), DOT_FP32=_dot_fp32(hidden.dtype))
    return logp, entropy, lse, mu


def logprobs_bwd(hidden, weight, targets, lse, mu, g_logp, g_ent, inv_temp: float):
    """Triton backward launcher. Returns (dhidden [N, H], dweight [V, H]) in the input dtype."""
    N, H = hidden.shape
    V = weight.shape[0]
    dhidden = torch.zeros(N, H, device=hidden.device, dtype=torch.float32)
    dweight = torch.zeros(V, H, device=hidden.device, dtype=torch.float32)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(V, BLOCK_V))
    _logprobs_bwd_kernel[grid](hidden, weight, targets, lse, mu, g_logp, g_ent, dhidden, dweight, N, V, H,
                               hidden.stride(0), weight.stride(0), inv_temp, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
                               BLOCK_H=BLOCK_H, PRECISION=_precision(hidden.dtype), DOT_FP32=_dot_fp32(hidden.dtype))
    return dhidden.to(hidden.dtype), dweight.to(weight.dtype)


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
        dhidden, dweight = logprobs_bwd(hidden, weight, targets, lse, mu, g_logp, g_ent, ctx.inv_temp)
        return dhidden, dweight, None, None


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Triton fused log-prob + entropy.

    hidden [N, H] and weight [V, H] in one of fp32/bf16/fp16 (same dtype), targets [N] int64 in [0, V).
    Returns (logp [N] fp32, entropy [N] fp32); differentiable in hidden and weight. Peak extra memory: four fp32
    [N] vectors in the forward; fp32 dhidden/dweight accumulators in the backward. Never launch on a CPU tensor
    outside TRITON_INTERPRET=1 (Triton has no CPU driver).
    """
    check_logprobs_inputs(hidden, weight, targets, temperature)
    if triton is None:
        raise ValueError("fused_logprobs needs triton; use logprobs_ref")
    return LogprobsFunction.apply(hidden, weight, targets, temperature)


# ----------------------------------------------------------------------------------------------------------------
# torch twin


def _ref_chunk_rows(V: int) -> int:
    return max(1, REF_CHUNK_ELEMS // max(V, 1))


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


def logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Torch twin of `fused_logprobs` (same signature and outputs), chunked over rows.

    hidden [N, H], weight [V, H] (same float dtype), targets [N] int64 -> (logp [N] fp32, entropy [N] fp32).
    At most REF_CHUNK_ELEMS logits (two fp32 buffers of that size) live at once, in forward and backward; the
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

    The op is fp32-only (the dtype it was measured in); bf16/fp16 inputs go to `logprobs_ref`.
    """
    check_logprobs_inputs(hidden, weight, targets, temperature)
    if hidden.dtype != torch.float32:
        return logprobs_ref(hidden, weight, targets, temperature)
    if not native.available():
        raise ValueError(f"fast_srt native library not built (expected at {native.LIB_PATH}); see csrc/README.md")
    grad_follows = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return native.NativeLogprobsFunction.apply(hidden, weight, targets, temperature, grad_follows)


def select_logprobs_impl(device: torch.device):
    """Choose the log-prob implementation once, for a device.

    CUDA -> `fused_logprobs` (Triton). CPU -> the C++ op if it is built and NATIVE_CPU_SPEEDUP >= NATIVE_MIN_SPEEDUP
    (set from bench/bench_logprobs.py on the development CPU), else `logprobs_ref`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if triton is None:
            raise ValueError("CUDA device but triton is not installed")
        return fused_logprobs
    if native.available() and NATIVE_CPU_SPEEDUP >= NATIVE_MIN_SPEEDUP:
        return logprobs_native
    return logprobs_ref
