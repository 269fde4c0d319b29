"""Optional C++ CPU ops from csrc/, built by CMake into kernels/_native/ (see csrc/README.md).

Nothing here is required: when the library is missing, `available()` is False and callers use the torch twin.
The library is loaded once, on first use, with torch.ops.load_library; it registers `torch.ops.fast_srt.*`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ._utils import _grads_or_zeros

LIB_NAME = "libfast_srt_native.so"
LIB_PATH = Path(__file__).resolve().parent / "_native" / LIB_NAME


@functools.cache
def available() -> bool:
    """True when the built library exists and loads (checked once per process)."""
    if not LIB_PATH.is_file():
        return False
    try:
        torch.ops.load_library(str(LIB_PATH))
    except (OSError, RuntimeError):
        return False
    return hasattr(torch.ops, "fast_srt") and hasattr(torch.ops.fast_srt, "logprobs_fwd")


class NativeLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper over torch.ops.fast_srt.logprobs_fwd / logprobs_bwd (CPU, fp32 or bf16)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        # detached: the op's internal out= matmuls must not see tensors that require grad
        hidden, weight = hidden.detach().contiguous(), weight.detach().contiguous()
        targets = targets.contiguous()
        inv_temp = 1.0 / float(temperature)
        logp, entropy, lse, mu = torch.ops.fast_srt.logprobs_fwd(hidden, weight, targets, inv_temp)
        ctx.save_for_backward(hidden, weight, targets, lse, mu)
        ctx.inv_temp = inv_temp
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, mu = ctx.saved_tensors
        g_logp, g_ent = _grads_or_zeros(g_logp, g_ent, lse)
        dhidden, dweight = torch.ops.fast_srt.logprobs_bwd(hidden, weight, targets, lse, mu, g_logp, g_ent,
                                                           ctx.inv_temp)
        return dhidden, dweight, None, None
