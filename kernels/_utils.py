"""Input checks shared by the kernels and their twins: bad input raises ValueError with what was wrong."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logprobs_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                          dtypes: tuple = FLOAT_DTYPES):
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("fused_logprobs: hidden and weight must be tensors")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            "fused_logprobs: hidden must be [N, H] and weight [V, H], "
            f"got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_logprobs: hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}"
        )
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"fused_logprobs: targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.dtype not in dtypes or weight.dtype != hidden.dtype:
        raise ValueError(
            f"fused_logprobs: hidden and weight must share one float dtype of {dtypes}, "
            f"got {hidden.dtype} and {weight.dtype}"
        )
    if targets.dtype != torch.int64:
        raise ValueError(f"fused_logprobs: targets must be int64, got {targets.dtype}")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError("fused_logprobs: hidden, weight and targets must be on one device")
    if not float(temperature) > 0.0:
        raise ValueError(f"fused_logprobs: temperature must be > 0, got {temperature}")


def check_packed(name: str, cu_seqlens: torch.Tensor, loss_mask: torch.Tensor, n_samples: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] != n_samples + 1:
        raise ValueError(f"{name}: cu_seqlens must be [S+1={n_samples + 1}], got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if loss_mask.dim() != 1 or loss_mask.dtype != torch.bool:
        raise ValueError(
            f"{name}: loss_mask must be a 1-D bool tensor [T], got {loss_mask.dtype} {tuple(loss_mask.shape)}"
        )
    # One host read of the last offset: cheap, and it catches the most common packing bug (T mismatch).
    if n_samples > 0 and int(cu_seqlens[-1]) != loss_mask.shape[0]:
        raise ValueError(f"{name}: cu_seqlens[-1]={int(cu_seqlens[-1])} but there are T={loss_mask.shape[0]} tokens")


def check_1d(name: str, what: str, t: torch.Tensor, length: int, dtypes: tuple) -> None:
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name}: {what} must be [{length}], got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: {what} must have dtype in {dtypes}, got {t.dtype}")


def _grads_or_zeros(g_logp, g_ent, like):
    """Output gradients for a (logp, entropy) backward: fp32, contiguous, zeros for an output that got none."""
    g_logp = torch.zeros_like(like) if g_logp is None else g_logp.float().contiguous()
    g_ent = torch.zeros_like(like) if g_ent is None else g_ent.float().contiguous()
    return g_logp, g_ent
