"""Fused RMSNorm, SwiGLU (silu(gate) * up) and rotary embedding, forward and backward: one Triton launch each
where the torch path dispatches several small ops.

Each is a torch custom op (`fast_srt::...`), so a dispatch counter (fast_srt.learner.op_count) sees one op, as a
GPU sees one launch. The op runs its Triton kernel on CUDA, or on CPU when triton runs in its interpreter (tests); otherwise
its torch twin, the same math in fp32 (ops_cpu: the op-count bench forces the fused path on CPU with it).
Semantics are those of the transformers modules they replace (LlamaRMSNorm, LlamaMLP's act_fn(gate) * up,
apply_rotary_pos_emb), output dtypes included; each computes in fp32 and rounds once.
"""

from __future__ import annotations

import torch

try:  # triton is absent on some CPU installs; the twins do not need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def uses_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA, and on CPU when triton was imported under its interpreter; the torch twin otherwise."""
    return triton is not None and (x.is_cuda or _interpreted())


def _interpreted() -> bool:
    """Whether this process's @triton.jit functions run in the interpreter (TRITON_INTERPRET=1 at triton's import:
    setting it later does not)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_silu_mul_kernel, InterpretedFunction)


def _block(n: int) -> int:
    return triton.next_power_of_2(n)


# --------------------------------------------------------------------------------------------------- RMSNorm
if triton is not None:
    @triton.jit
    def _rms_fwd_kernel(X, W, Y, RSTD, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        x_in = tl.load(X + row * N + offs, mask=m, other=0.0)
        x = x_in.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        xh = (x * rstd).to(x_in.dtype).to(tl.float32)  # transformers rounds x_hat to the input dtype first
        w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * N + offs, (xh * w).to(Y.dtype.element_ty), mask=m)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, M, N, rows_per, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(rows_per):
            row = pid * rows_per + i
            mr = m & ((tl.zeros([BLOCK], dtype=tl.int32) + row) < M)  # a row past the end adds nothing
            x_in = tl.load(X + row * N + offs, mask=mr, other=0.0)
            x = x_in.to(tl.float32)
            dy = tl.load(DY + row * N + offs, mask=mr, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + tl.minimum(row, M - 1))
            xh = x * rstd
            g = dy * w
            dx = rstd * (g - xh * (tl.sum(g * xh, axis=0) / N))
            tl.store(DX + row * N + offs, dx.to(DX.dtype.element_ty), mask=mr)
            dw += dy * xh.to(x_in.dtype).to(tl.float32)
        tl.store(DW_PART + pid * N + offs, dw, mask=m)


@torch.library.custom_op("fast_srt::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] contiguous, w [N] -> (y [M, N] in result_type(w, x), rstd [M] fp32)."""
    out_dtype = torch.result_type(w, x)
    if not uses_triton(x):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1) + eps)
        return (w * (x32 * rstd[:, None]).to(x.dtype)).to(out_dtype), rstd
    M, N = x.shape
    y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    _rms_fwd_kernel[(M,)](x, w, y, rstd, N, eps, BLOCK=_block(N))
    return y, rstd


@torch.library.custom_op("fast_srt::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [M, N] in x's dtype, dw [N] in w's dtype)."""
    dy = dy.contiguous()
    if not uses_triton(x):
        x32, g = x.float(), dy.float() * w.float()
        xh = x32 * rstd[:, None]
        dx = rstd[:, None] * (g - xh * (g * xh).mean(-1, keepdim=True))
        dw = (dy.float() * xh.to(x.dtype).float()).sum(0)
        return dx.to(x.dtype), dw.to(w.dtype)
    M, N = x.shape
    programs = min(M, 4 * 132) if x.is_cuda else min(M, 4)
    rows_per = triton.cdiv(M, programs)
    dx = torch.empty_like(x)
    part = torch.empty(programs, N, dtype=torch.float32, device=x.device)
    _rms_bwd_kernel[(programs,)](dy, x, w, rstd, dx, part, M, N, rows_per, BLOCK=_block(N))
    return dx, part.sum(0).to(w.dtype)


def _rms_setup(ctx, inputs, output):
    x, w, _ = inputs
    ctx.save_for_backward(x, w, output[1])


def _rms_backward(ctx, dy, _drstd):
    x, w, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, w, rstd)
    return dx, dw, None


rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's forward: w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), over the last dim of x [..., N]."""
    y, _ = rms_norm_fwd(x.reshape(-1, x.shape[-1]).contiguous(), w, float(eps))
    return y.view(*x.shape[:-1], x.shape[-1])


# --------------------------------------------------------------------------------------------------- SwiGLU
if triton is not None:
    @triton.jit
    def _silu_mul_kernel(A, B, DC, OUT_A, OUT_B, n, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        a = tl.load(A + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-a))
        if BACKWARD:
            dc = tl.load(DC + offs, mask=m, other=0.0).to(tl.float32)
            da = dc * b * sig * (1.0 + a * (1.0 - sig))
            tl.store(OUT_A + offs, da.to(OUT_A.dtype.element_ty), mask=m)
            tl.store(OUT_B + offs, (dc * a * sig).to(OUT_B.dtype.element_ty), mask=m)
        else:
            tl.store(OUT_A + offs, (a * sig * b).to(OUT_A.dtype.element_ty), mask=m)


@torch.library.custom_op("fast_srt::silu_mul_fwd", mutates_args=())
def silu_mul_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b, a and b contiguous of one shape, in result_type(a, b)."""
    out_dtype = torch.result_type(a, b)
    if not uses_triton(a):
        a32 = a.float()
        return (a32 * torch.sigmoid(a32) * b.float()).to(out_dtype)
    c = torch.empty(a.shape, dtype=out_dtype, device=a.device)
    _silu_mul_kernel[(triton.cdiv(a.numel(), 1024),)](a, b, a, c, c, a.numel(), BACKWARD=False, BLOCK=1024)
    return c


@torch.library.custom_op("fast_srt::silu_mul_bwd", mutates_args=())
def silu_mul_bwd(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dc = dc.contiguous()
    if not uses_triton(a):
        a32, b32, d32 = a.float(), b.float(), dc.float()
        sig = torch.sigmoid(a32)
        return (d32 * b32 * sig * (1 + a32 * (1 - sig))).to(a.dtype), (d32 * a32 * sig).to(b.dtype)
    da, db = torch.empty_like(a), torch.empty_like(b)
    _silu_mul_kernel[(triton.cdiv(a.numel(), 1024),)](a, b, dc, da, db, a.numel(), BACKWARD=True, BLOCK=1024)
    return da, db


def _silu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_backward(ctx, dc):
    return silu_mul_bwd(dc, *ctx.saved_tensors)


silu_mul_fwd.register_autograd(_silu_backward, setup_context=_silu_setup)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b (the SwiGLU MLP's inner product), rounded once."""
    return silu_mul_fwd(a.contiguous(), b.contiguous())


# --------------------------------------------------------------------------------------------------- RoPE
if triton is not None:
    @triton.jit
    def _rope_kernel(X, COS, SIN, OUT, H, HALF, BACKWARD: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
        """One row (a token): X/OUT [R, H, 2 * HALF], COS/SIN [R, 2 * HALF]. Forward: (x1 c1 - x2 s1, x2 c2 + x1 s2);
        backward (the transpose): (g1 c1 + g2 s2, g2 c2 - g1 s1)."""
        r = tl.program_id(0)
        h = tl.arange(0, BH)[:, None]
        d = tl.arange(0, BD)[None, :]
        md = d < HALF
        m = (h < H) & md
        D = 2 * HALF
        c1 = tl.load(COS + r * D + d, mask=md, other=0.0).to(tl.float32)
        c2 = tl.load(COS + r * D + HALF + d, mask=md, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + r * D + d, mask=md, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + r * D + HALF + d, mask=md, other=0.0).to(tl.float32)
        base = r * H * D + h * D
        x1 = tl.load(X + base + d, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + base + HALF + d, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(OUT + base + d, o1.to(OUT.dtype.element_ty), mask=m)
        tl.store(OUT + base + HALF + d, o2.to(OUT.dtype.element_ty), mask=m)


def _rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype, backward: bool) -> torch.Tensor:
    """x [R, H, D] contiguous, cos/sin [R, D] contiguous -> [R, H, D] in out_dtype."""
    if not uses_triton(x):
        half = x.shape[-1] // 2
        x32, c, s = x.float(), cos.float()[:, None], sin.float()[:, None]
        x1, x2 = x32[..., :half], x32[..., half:]
        c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
        if backward:
            out = torch.cat([x1 * c1 + x2 * s2, x2 * c2 - x1 * s1], -1)
        else:
            out = torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], -1)
        return out.to(out_dtype)
    R, H, D = x.shape
    out = torch.empty(R, H, D, dtype=out_dtype, device=x.device)
    _rope_kernel[(R,)](x, cos, sin, out, H, D // 2, BACKWARD=backward, BH=_block(H), BD=_block(D // 2))
    return out


@torch.library.custom_op("fast_srt::rope_fwd", mutates_args=())
def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, Hq, D], k [R, Hk, D], cos/sin [R, D], all contiguous -> rotated q, k in result_type(q|k, cos)."""
    return (_rope_rows(q, cos, sin, torch.result_type(q, cos), False),
            _rope_rows(k, cos, sin, torch.result_type(k, cos), False))


@torch.library.custom_op("fast_srt::rope_bwd", mutates_args=())
def rope_bwd(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_dtype: torch.dtype,
             k_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (_rope_rows(dq.contiguous(), cos, sin, q_dtype, True),
            _rope_rows(dk.contiguous(), cos, sin, k_dtype, True))


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.dtypes = (q.dtype, k.dtype)


def _rope_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = rope_bwd(dq, dk, cos, sin, *ctx.dtypes)
    return dq, dk, None, None


rope_fwd.register_autograd(_rope_backward, setup_context=_rope_setup)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    """transformers' apply_rotary_pos_emb for q [B, Hq, T, D], k [B, Hk, T, D], cos/sin [B or 1, T, D]; the
    outputs keep q's [B, T, H, D] memory layout (that of the projections' views)."""
    if unsqueeze_dim != 1 or q.dim() != 4:
        raise ValueError(f"apply_rope: q [B, H, T, D] with unsqueeze_dim 1, got {tuple(q.shape)}, {unsqueeze_dim}")
    B, _, T, D = q.shape
    rows = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], D)  # noqa: E731  [B*T, H, D], a view when it can be
    c, s = (x.expand(B, T, D).reshape(B * T, D).contiguous() for x in (cos, sin))
    qo, ko = rope_fwd(rows(q).contiguous(), rows(k).contiguous(), c, s)
    unrows = lambda x, h: x.view(B, T, h, D).transpose(1, 2)  # noqa: E731
    return unrows(qo, q.shape[1]), unrows(ko, k.shape[1])
