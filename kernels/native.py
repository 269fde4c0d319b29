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


# The forward keeps its [N, V] fp32 logits for the backward (which then skips recomputing hidden @ weight.T, one of
# its three GEMMs) when they take at most this much; above it the backward recomputes them tile by tile. The buffer
# is reused from one backward to the next forward (_LogitsBuffer): in a training process fresh pages cost about as
# much as the GEMM they save (docs/measurements.md). fast_srt.run.plan counts it on CPU.
STORE_LOGITS_MAX_BYTES = 1 << 30


class _LogitsBuffer:
    """One flat fp32 buffer, lent to a forward and given back by its backward (only then: a graph that is never
    backpropagated keeps its buffer, and the next forward gets a new one). Kept between steps, like a caching
    allocator: at most STORE_LOGITS_MAX_BYTES."""

    def __init__(self):
        self.idle: torch.Tensor | None = None

    def lend(self, rows: int, cols: int) -> torch.Tensor:
        flat, self.idle = self.idle, None
        if flat is None or flat.numel() < rows * cols:
            del flat  # the smaller one goes before the new one is allocated
            flat = torch.empty(rows * cols, dtype=torch.float32)
        return flat[: rows * cols].view(rows, cols)

    def give_back(self, logits: torch.Tensor) -> None:
        base = logits._base if logits._base is not None else logits
        if self.idle is None or self.idle.numel() < base.numel():
            self.idle = base


LOGITS_BUFFER = _LogitsBuffer()


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
    def forward(ctx, hidden, weight, targets, temperature, grad_follows=False):
        # grad_follows: the caller's grad mode and requires_grad (inside forward grad mode is always off, and
        # ctx.needs_input_grad is set even under no_grad)
        # detached: the op's internal out= matmuls must not see tensors that require grad
        hidden, weight = hidden.detach().contiguous(), weight.detach().contiguous()
        targets = targets.contiguous()
        inv_temp = 1.0 / float(temperature)
        N, V = hidden.shape[0], weight.shape[0]
        store = grad_follows and N * V * 4 <= STORE_LOGITS_MAX_BYTES
        logits = LOGITS_BUFFER.lend(N, V) if store else hidden.new_empty(0)
        logp, entropy, lse, mu = torch.ops.fast_srt.logprobs_fwd(hidden, weight, targets, inv_temp, logits)
        ctx.save_for_backward(hidden, weight, targets, lse, mu)
        ctx.logits = logits if store else None  # not a saved tensor: the backward hands it back to the pool
        ctx.inv_temp = inv_temp
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, mu = ctx.saved_tensors
        g_logp, g_ent = _grads_or_zeros(g_logp, g_ent, lse)
        logits, ctx.logits = ctx.logits, None  # a second backward (retain_graph) recomputes them
        dhidden, dweight = torch.ops.fast_srt.logprobs_bwd(
            hidden, weight, targets, lse, mu, g_logp, g_ent, ctx.inv_temp,
            logits if logits is not None else hidden.new_empty(0))
        if logits is not None:
            LOGITS_BUFFER.give_back(logits)
        return dhidden, dweight, None, None, None
