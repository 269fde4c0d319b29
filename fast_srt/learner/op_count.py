"""Count the ops a computation dispatches (ATen ops and registered custom ops, forward and backward), a device-free
stand-in for kernel launches: on CUDA nearly every dispatched op is one launch or more, a fused kernel registered as
a custom op is one. The launch budget (tests/learner/test_launch_budget.py) holds these counts fixed as the number of
tree pieces grows."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from torch.utils._python_dispatch import TorchDispatchMode

# ops that move no data and launch nothing: views, shape queries, metadata
FREE_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.t", "aten.transpose", "aten.permute", "aten.expand", "aten.slice",
    "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.split", "aten.split_with_sizes", "aten.unbind",
    "aten.as_strided", "aten.alias", "aten.detach", "aten.sym_size", "aten.sym_stride", "aten.sym_numel",
    "aten.sym_storage_offset", "aten.is_same_size", "aten.lift_fresh", "aten.reshape", "aten._reshape_alias",
    "aten.empty_like", "aten.empty", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
    "prim.device", "prim.layout", "aten.is_nonzero", "aten._local_scalar_dense",
})


def op_name(func) -> str:
    """'aten.mm' for aten.mm.default: the overload packet's qualified name."""
    packet = getattr(func, "overloadpacket", func)
    return str(packet)


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched while active, by name (`counts`); `launches` leaves out FREE_OPS."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[op_name(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def launches(self) -> int:
        return sum(n for name, n in self.counts.items() if name not in FREE_OPS)


@contextlib.contextmanager
def count_ops() -> Iterator[OpCounter]:
    """with count_ops() as c: ... -> c.counts, c.total, c.launches (autograd's backward ops included when the
    backward runs inside the block)."""
    counter = OpCounter()
    with counter:
        yield counter


def ops_of(fn, *args, **kwargs) -> tuple[object, OpCounter]:
    """(fn's result, the OpCounter of its call)."""
    with count_ops() as c:
        out = fn(*args, **kwargs)
    return out, c
