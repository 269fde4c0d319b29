"""What the learner's step needs from torch.distributed when several ranks train one model (`torchrun`); with one
process every function here is the identity and costs one check.

Each rank holds the whole model, plays its own share of the games and computes its own micro-batches; one optimizer
step is then the step of a single process on the union of every rank's samples:
- the loss is a token mean over the whole mini-batch, all ranks together: each rank divides its tokens' loss sum by
  the global token count (`all_sum`), so the sum of the ranks' gradients is the gradient of the global mean;
- `reduce_gradients` sums the ranks' gradients (in buckets, as DDP does) before clipping, so every rank clips the
  same gradient and takes the same optimizer step: the weights stay identical on every rank without a broadcast;
- a skipped update (non-finite loss or gradient on any rank) is skipped on every rank (`all_true`).
The ranks run different numbers of micro-batches (their samples differ in length), which DDP's one-all-reduce-per-
backward cannot follow; the gradients are therefore reduced once per optimizer step, after the last micro-batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 * 2**20  # gradients are summed in buckets of about this size (one extra buffer, not a model copy)

_cpu_group = None  # a gloo group for small host-side reductions (flags, counts) when the default group is NCCL


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def set_cpu_group(group) -> None:
    global _cpu_group
    _cpu_group = group


def _host_reduce(values: list, op, dtype=torch.float64) -> list:
    t = torch.tensor(values, dtype=dtype)
    dist.all_reduce(t, op=op, group=_cpu_group)
    return t.tolist()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64 on the host)."""
    return _host_reduce(values, dist.ReduceOp.SUM) if active() else list(values)


def all_max(value: int) -> int:
    return int(_host_reduce([value], dist.ReduceOp.MAX, torch.int64)[0]) if active() else value


def all_true(flag: bool) -> bool:
    return bool(_host_reduce([int(flag)], dist.ReduceOp.MIN, torch.int64)[0]) if active() else flag


def reduce_gradients(params) -> None:
    """Sum every trainable parameter's gradient over the ranks, in place (a rank with no gradient for a parameter
    contributes zeros). Buckets of about BUCKET_BYTES, one all-reduce each."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= BUCKET_BYTES:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (as DDP does at wrap time), so that a difference at load
    (a random LoRA initialisation, say) cannot make the ranks train different models."""
    if not active():
        return
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)
