"""The collectives of one training step on one rank, traced: what `bench.plan.formula` prices with the network's
fits.

Traced where the rank is simulated as it runs (`bench.plan.memory.simulate_rank`): every c10d and functional
collective the step dispatches, recorded with its nccl-tests size (all_gather's gathered output,
reduce_scatter's input, the all-reduced tensor), its group's size and its span (the consecutive ranks from rank 0
its group reaches: whether it crosses a node is the network's to say), so FSDP's per-unit all-gathers and
reduce-scatters and tensor parallelism's per-layer all-reduces are counted as they run, not from a formula.
Where a strategy's own code cannot run on fake tensors (a C++ reducer, a schedule's sends), the strategy counts
its collectives itself (its `collectives` hook, `bench.strategies`).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# op name -> (collective, where its nccl-tests size is: "out" the first tensor (or the first list), "in" the
# second half of the tensors, "all" every tensor argument, "gathered" the input times the group, "scattered" the
# input, every tensor argument)
OPS = {
    "all_reduce": ("all_reduce", "all"),
    "all_reduce_": ("all_reduce", "all"),
    "allreduce_": ("all_reduce", "all"),
    "allreduce_coalesced_": ("all_reduce", "all"),
    "all_gather_into_tensor": ("all_gather", "gathered"),
    "_allgather_base_": ("all_gather", "out"),
    "allgather_into_tensor_coalesced_": ("all_gather", "out"),
    "reduce_scatter_tensor": ("reduce_scatter", "scattered"),
    "_reduce_scatter_base_": ("reduce_scatter", "in"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "in"),
    "broadcast_": ("broadcast", "all"),
    "broadcast": ("broadcast", "all"),
    "all_to_all_single": ("all_to_all", "all"),
    "alltoall_base_": ("all_to_all", "in"),
    "send": ("p2p", "all"),
    "recv_": ("p2p", "all"),
}


class CollectiveRecorder(TorchDispatchMode):
    """Records {(collective, group size, span): [calls, bytes]} of what runs under it (rank 0's)."""

    def __init__(self, world_size: int):
        super().__init__()
        self.world_size = world_size
        self.counts: dict[tuple[str, int, int], list[float]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional") and func.__name__.split(".")[0] in OPS:
            kind, which = OPS[func.__name__.split(".")[0]]
            tensors = [t for t in _flat(args) if isinstance(t, torch.Tensor)]
            n, span = _group(args, kwargs, self.world_size)
            if which == "out":
                size = _bytes(tensors[:1] if not isinstance(args[0], list) else args[0])
            elif which == "in":
                size = _bytes(tensors[len(tensors) // 2:])
            elif which == "gathered":
                size = _bytes(tensors) * n
            else:  # "all" and "scattered": the tensors passed are the collective's whole size
                size = _bytes(tensors)
            calls = self.counts.setdefault((kind, n, span), [0, 0.0])
            calls[0] += 1
            calls[1] += size
        return func(*args, **kwargs)

    def as_list(self) -> list[dict]:
        return [{"collective": kind, "ranks": n, "span": span, "calls": calls, "bytes": size}
                for (kind, n, span), (calls, size) in sorted(self.counts.items())]


def _flat(values) -> list:
    out = []
    for v in values:
        out.extend(_flat(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _bytes(tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors))


def _group(args, kwargs, world_size: int) -> tuple[int, int]:
    """The collective's group size and span (its highest rank + 1: rank 0's groups start at 0): a ProcessGroup
    argument (c10d ops pass it boxed), a group name (functional ops), else the world."""
    import torch.distributed as dist

    for value in [*args, *kwargs.values()]:
        group = None
        if isinstance(value, dist.ProcessGroup):
            group = value
        elif type(value).__name__ == "ScriptObject":  # how a c10d op receives its ProcessGroup
            try:
                group = dist.ProcessGroup.unbox(value)
            except (RuntimeError, TypeError, AttributeError):
                continue
        elif isinstance(value, str) and value not in ("sum", "avg", "max", "min", "product"):
            try:
                group = dist.distributed_c10d._resolve_process_group(value)
            except (KeyError, RuntimeError, ValueError):
                continue
        if group is not None:
            return group.size(), _span(group)
    return world_size, world_size


def _span(group) -> int:
    import torch.distributed as dist

    try:
        return max(dist.get_process_group_ranks(group)) + 1
    except (RuntimeError, ValueError, KeyError):  # a group c10d does not know the ranks of: taken as consecutive
        return group.size()
