"""The packed attention's one-call path: the block mask, the varlen twin against per-segment attention in float64
(forward and backward, grouped heads, ragged segments, a segment without context), the kernel choice, and on CUDA
torch's varlen call against the twin."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from fast_srt.learner import attention as A


def segments(seed: int, n: int):
    """n ragged (queries, context) segments, the first without context; keys = context + queries."""
    rng = random.Random(seed)
    qs = [rng.randrange(1, 23) for _ in range(n)]
    ctx = [0] + [rng.choice([0, rng.randrange(1, 40)]) for _ in range(n - 1)]
    return qs, ctx


def cu(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def reference_mask(qs, ctx) -> torch.Tensor:
    rows = []
    for s, (n, c) in enumerate(zip(qs, ctx)):
        for i in range(n):
            row = []
            for t, (m, d) in enumerate(zip(qs, ctx)):
                row += [t == s and j <= c + i for j in range(d + m)]
            rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_mask_is_bottom_right_causal_within_each_segment(seed):
    qs, ctx = segments(seed, 7)
    keys = [c + n for c, n in zip(ctx, qs)]
    got = A.bottom_right_block_mask(cu(qs), cu(keys), sum(qs), sum(keys))
    assert torch.equal(got, reference_mask(qs, ctx))


def random_qkv(qs, ctx, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(qs), sum(c + n for c, n in zip(ctx, qs))
    make = lambda t, h: torch.randn(t, h, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa
    return make(tq, hq), make(tk, hkv), make(tk, hkv)


def per_segment(q, k, v, qs, ctx, scale):
    """Reference: per-segment attention written out (softmax of masked scores), grouped heads repeated."""
    rep = q.shape[1] // k.shape[1]
    outs, kq, kk = [], 0, 0
    for n, c in zip(qs, ctx):
        qi, ki, vi = q[kq:kq + n], k[kk:kk + c + n], v[kk:kk + c + n]
        ki, vi = ki.repeat_interleave(rep, 1), vi.repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        keep = torch.ones(n, c + n, dtype=torch.bool).tril(c)
        p = s.masked_fill(~keep, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", p, vi))
        kq, kk = kq + n, kk + c + n
    return torch.cat(outs)


def grads(out, w, *xs):
    return torch.autograd.grad((out.float() * w).sum(), xs)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3), (6, 1)])
def test_varlen_twin_matches_per_segment_attention_fp32(seed, hq, hkv):
    """fp32 twin against the float64 reference: output and q/k/v gradients within 1e-5 (normwise)."""
    qs, ctx = segments(seed, 9)
    keys = [c + n for c, n in zip(ctx, qs)]
    q, k, v = random_qkv(qs, ctx, hq, hkv, 16, torch.float64, seed)
    scale = 16 ** -0.5 * 1.3
    ref = per_segment(q, k, v, qs, ctx, scale)
    w = torch.randn_like(ref)
    gref = grads(ref, w, q, k, v)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = A.varlen_twin(q32, k32, v32, cu(qs), cu(keys), max(qs), max(keys), scale)
    g32 = grads(out, w.float(), q32, k32, v32)
    for got, want in zip((out, *g32), (ref, *gref)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-5, err


def test_varlen_twin_bf16_is_within_bf16_error_like_per_segment_sdpa():
    """bf16 inputs: the twin's error against float64 is a bf16 error, no larger than 2x that of per-segment SDPA
    on the same bf16 inputs (+ 1e-3)."""
    qs, ctx = segments(5, 8)
    keys = [c + n for c, n in zip(ctx, qs)]
    q, k, v = random_qkv(qs, ctx, 4, 2, 32, torch.bfloat16, 5)
    ref = per_segment(*(x.detach().double() for x in (q, k, v)), qs, ctx, 32 ** -0.5)
    twin = A.varlen_twin(q, k, v, cu(qs), cu(keys), max(qs), max(keys), 32 ** -0.5)
    mask_of = lambda n, c: torch.ones(n, c + n, dtype=torch.bool).tril(c)  # noqa: E731
    pieces = A.per_segment_sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], qs,
                                keys, ctx, mask_of, 32 ** -0.5, 0.0)[0].transpose(0, 1)
    e_twin = (twin.double() - ref).abs().max().item()
    e_pieces = (pieces.double() - ref).abs().max().item()
    assert e_twin < 0.05 and e_twin <= 2 * e_pieces + 1e-3, (e_twin, e_pieces)


def fake_query(cuda: bool, dtype):
    return SimpleNamespace(is_cuda=cuda, dtype=dtype)


def test_kernel_choice(monkeypatch):
    monkeypatch.setattr(A, "has_flash_attn", lambda: False)
    monkeypatch.setattr(A, "torch_varlen_params", lambda: frozenset({"window_size"}))
    assert A.packed_attention_kernel(fake_query(False, torch.float32), 0.0) == A.PER_PIECE
    assert A.packed_attention_kernel(fake_query(True, torch.bfloat16), 0.0) == A.VARLEN
    assert A.packed_attention_kernel(fake_query(True, torch.bfloat16), 0.1) == A.MASKED  # varlen has no dropout
    assert A.packed_attention_kernel(fake_query(True, torch.float32), 0.0) == A.MASKED
    monkeypatch.setattr(A, "torch_varlen_params", lambda: frozenset())
    assert A.packed_attention_kernel(fake_query(True, torch.bfloat16), 0.0) == A.MASKED
    monkeypatch.setattr(A, "has_flash_attn", lambda: True)
    assert A.packed_attention_kernel(fake_query(True, torch.bfloat16), 0.0) == A.FLASH_ATTN
    monkeypatch.setattr(A, "FORCED_KERNEL", A.VARLEN)
    assert A.packed_attention_kernel(fake_query(False, torch.float32), 0.0) == A.VARLEN


def test_this_torch_has_a_varlen_attention_with_causal_windows():
    """The CUDA path's kernel exists in the CPU build's torch too (its signature is what torch_varlen adapts to)."""
    assert {"window_size", "scale", "enable_gqa"} <= A.torch_varlen_params()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4)])
def test_torch_varlen_on_cuda_matches_the_twin_bf16(hq, hkv):
    """CUDA, bf16: torch's varlen call and the twin (one masked SDPA) agree within bf16 error, forward and
    backward, on ragged segments with and without context."""
    qs, ctx = segments(11, 12)
    keys = [c + n for c, n in zip(ctx, qs)]
    q, k, v = (x.detach().cuda().requires_grad_() for x in random_qkv(qs, ctx, hq, hkv, 64, torch.bfloat16, 1))
    args = (cu(qs, "cuda"), cu(keys, "cuda"), max(qs), max(keys), 0.125)
    w = torch.randn(q.shape, device="cuda")
    got = A.torch_varlen(q, k, v, *args)
    g_got = grads(got, w, q, k, v)
    want = A.varlen_twin(q, k, v, *args)
    g_want = grads(want, w, q, k, v)
    for a, b in zip((got, *g_got), (want, *g_want)):
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err < 2e-2, err
