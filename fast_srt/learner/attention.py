"""Attention over a packed row (no padding): whole samples, or the pieces of a shared-prefix row (pack_shared).

A packed call is a varlen problem: query segment i (a sample, or a piece) attends to key segment i, causally
aligned to the bottom right (a piece's queries sit at the end of its keys: its ancestors', then its own). The kernel
is chosen in one place, `packed_attention_kernel`, from the device, the dtype and the dropout:

    flash_attn  CUDA, half precision, flash-attn installed: its varlen kernel, one call per layer
    varlen      CUDA, half precision, no dropout: torch's varlen_attn (the flash kernel in torch), one call per layer
    masked      CUDA otherwise (fp32, or dropout): one SDPA call per layer with a [Tq, Tk] block mask
    per_piece   CPU: one SDPA call per segment (no work on cross-segment blocks; bench/results/attention_cpu_2026-11-30.md)

`varlen_twin` is the CPU twin of the varlen call: the same arguments, the same result, one SDPA call with the block
mask built on the device from cu_q / cu_k (no host sync). Off CUDA the `varlen` and `masked` kernels both run it,
so tests (and the op-count bench) take the one-call path on CPU by setting FORCED_KERNEL.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect

import torch
from torch.nn.functional import scaled_dot_product_attention

FLASH_ATTN, VARLEN, MASKED, PER_PIECE = "flash_attn", "varlen", "masked", "per_piece"
KERNELS = (FLASH_ATTN, VARLEN, MASKED, PER_PIECE)
FORCED_KERNEL: str | None = None  # tests and benches: take this kernel whatever the device


@functools.cache
def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def torch_varlen_params() -> frozenset[str]:
    """The keyword names of torch.nn.attention.varlen.varlen_attn (empty when this torch has none)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def packed_attention_kernel(query: torch.Tensor, dropout: float) -> str:
    """The kernel of a packed attention call with these (already cast) queries: see the module docstring."""
    if FORCED_KERNEL is not None:
        return FORCED_KERNEL
    if not query.is_cuda:
        return PER_PIECE
    half = query.dtype in (torch.float16, torch.bfloat16)
    if half and has_flash_attn():
        return FLASH_ATTN
    if half and dropout == 0.0 and torch_varlen_params():
        return VARLEN
    return MASKED


def attention_inputs(query, key, value):
    """(q, k, v, out_dtype): the dtype the attention computes in, and the dtype its output must have (the one
    autocast or the plain path would give: the next projection sees the same dtype as before).

    CUDA: autocast's dtype (RoPE leaves q and k in fp32 beside a bf16 v), what the flash kernels expect. CPU: fp32,
    with autocast off around the SDPA calls (sdpa_context): torch's CPU flash backward is faster in fp32 than in
    bf16 at these shapes (bench/results/attention_cpu_2026-11-30.md), and fp32 is the more precise of the two."""
    dev = query.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else value.dtype
    dt = torch.float32 if dev == "cpu" else out_dtype
    return query.to(dt), key.to(dt), value.to(dt), out_dtype


def sdpa_context(query):
    """Around the packed SDPA calls. CPU: autocast off while SDPA runs on fp32 inputs (CPU autocast would cast them
    back to bf16). CUDA: flash, memory-efficient or math SDPA, never cuDNN's, which builds an execution graph for
    every new shape (profile: bench/results/learner_gpu_smollm2-135m_2026-11-30_profile.txt)."""
    if query.device.type == "cpu":
        return torch.autocast("cpu", enabled=False)
    if query.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    return contextlib.nullcontext()


def bottom_right_block_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int) -> torch.Tensor:
    """[Tq, Tk] bool: query i of segment s sees key j of segment s when j's distance to the end of its segment is at
    least i's (causal, aligned to the bottom right). Built on cu_q's device, without a host sync."""
    dev = cu_q.device
    ends_q, ends_k = cu_q[1:].long(), cu_k[1:].long()
    iq = torch.arange(total_q, device=dev)
    ik = torch.arange(total_k, device=dev)
    seg_q = torch.searchsorted(ends_q, iq, right=True)  # [Tq] segment of each query
    seg_k = torch.searchsorted(ends_k, ik, right=True)  # [Tk]
    left_q = ends_q[seg_q] - iq  # [Tq] 1 for a segment's last query
    left_k = ends_k[seg_k] - ik  # [Tk]
    return (seg_q[:, None] == seg_k[None, :]) & (left_k[None, :] >= left_q[:, None])


def varlen_twin(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale=None, dropout: float = 0.0) -> torch.Tensor:
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] -> [Tq, Hq, D]: what the varlen call computes (segments, bottom-right causal,
    grouped heads), as one SDPA call with a block mask; max_q / max_k are unused (the varlen kernels' arguments)."""
    mask = bottom_right_block_mask(cu_q, cu_k, q.shape[0], k.shape[0])
    with sdpa_context(q):
        out = scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=mask, dropout_p=dropout, scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])  # [1, Hq, Tq, D]
    return out[0].transpose(0, 1)  # [Tq, Hq, D]


def torch_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale=None) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn, bottom-right causal, across its signatures: (window_size, scale,
    enable_gqa) in newer torch, (is_causal) in older, where grouped heads are repeated and the scale goes into q.
    Off CUDA: varlen_twin."""
    if not q.is_cuda:
        return varlen_twin(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    from torch.nn.attention.varlen import varlen_attn

    params = torch_varlen_params()
    if "window_size" in params:
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0),
                           enable_gqa=q.shape[1] != k.shape[1])
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if scale is not None and "scale" not in params:
        q = q * (scale * q.shape[-1] ** 0.5)
        scale = None
    extra = {"scale": scale} if "scale" in params else {}
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True, **extra)


def flash_attn_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale=None, dropout: float = 0.0):
    """flash-attn's varlen kernel, [T, H, D] in and out (its causal mask is bottom-right aligned)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scale,
                                  causal=True)


def one_call_attention(kernel: str, q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale, dropout: float):
    """[1, H, T, D] q and gathered k/v -> [1, Tq, Hq, D]: the whole row in one kernel call (not PER_PIECE)."""
    q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, H, D] views
    if kernel == FLASH_ATTN:
        out = flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout)
    elif kernel == VARLEN:
        if dropout:
            raise ValueError("the varlen kernel has no dropout")
        out = torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    elif kernel == MASKED:
        out = varlen_twin(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout)
    else:
        raise ValueError(f"one_call_attention: unknown kernel {kernel!r} (one of {KERNELS[:3]})")
    return out[None]  # [1, Tq, Hq, D]


def per_segment_sdpa(q, k, v, q_lengths, k_lengths, context, mask_of, scale, dropout: float) -> torch.Tensor:
    """[1, H, T, D] q and k/v -> [1, Hq, Tq, D], one SDPA call per segment: causal when it has no context, else
    with mask_of(n, context) (the piece's [n, context + n] additive mask, cached by its owner)."""
    gqa = q.shape[1] != k.shape[1]
    # split (not slicing in a loop): its backward is one cat, where S slices would each zero-fill and add a
    # full-size [1, H, T, D] gradient
    qs = q.split(list(q_lengths), dim=2)
    ks, vs = (x.split(list(k_lengths), dim=2) for x in (k, v))
    outs = []
    with sdpa_context(q):
        for qi, ki, vi, c in zip(qs, ks, vs, context):
            if c == 0:
                o = scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout, is_causal=True, scale=scale,
                                                 enable_gqa=gqa)
            else:
                o = scaled_dot_product_attention(qi, ki, vi, attn_mask=mask_of(qi.shape[2], c), dropout_p=dropout,
                                                 scale=scale, enable_gqa=gqa)
            outs.append(o)  # [1, Hq, n, D]
    return torch.cat(outs, dim=2)  # [1, Hq, T, D]
