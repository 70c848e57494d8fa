"""The collectives of one training step on one rank: what `bench.plan.steptime` prices with the network's fits.

Traced where the rank is simulated (`bench.plan.memory.simulate_rank`: fsdp, tensor): every c10d and
functional collective the step dispatches, recorded with its nccl-tests size (all_gather's gathered output,
reduce_scatter's input, the all-reduced tensor) and its group's size, so FSDP's per-unit all-gathers and
reduce-scatters and tensor parallelism's per-layer all-reduces are counted as they run, not from a formula.
Counted from the model where the strategy's own code cannot run on fake tensors (`per_step`: DDP's C++
reducer, ZeRO's broadcasts, the pipeline's sends), from the same numbers the strategy uses (bucket cap,
parameter tensors, micro-batches).
"""

from __future__ import annotations

import math

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
    """Records {(collective, group size): [calls, bytes]} of what runs under it."""

    def __init__(self, world_size: int):
        super().__init__()
        self.world_size = world_size
        self.counts: dict[tuple[str, int], list[float]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional") and func.__name__.split(".")[0] in OPS:
            kind, which = OPS[func.__name__.split(".")[0]]
            tensors = [t for t in _flat(args) if isinstance(t, torch.Tensor)]
            n = _group_size(args, kwargs, self.world_size)
            if which == "out":
                size = _bytes(tensors[:1] if not isinstance(args[0], list) else args[0])
            elif which == "in":
                size = _bytes(tensors[len(tensors) // 2:])
            elif which == "gathered":
                size = _bytes(tensors) * n
            else:  # "all" and "scattered": the tensors passed are the collective's whole size
                size = _bytes(tensors)
            calls = self.counts.setdefault((kind, n), [0, 0.0])
            calls[0] += 1
            calls[1] += size
        return func(*args, **kwargs)

    def as_list(self) -> list[dict]:
        return [{"collective": kind, "ranks": n, "calls": calls, "bytes": size}
                for (kind, n), (calls, size) in sorted(self.counts.items())]


def _flat(values) -> list:
    out = []
    for v in values:
        out.extend(_flat(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _bytes(tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors))


def _group_size(args, kwargs, world_size: int) -> int:
    """The collective's group: a ProcessGroup argument (c10d ops pass it boxed), a group name (functional
    ops), else the world."""
    import torch.distributed as dist

    for value in [*args, *kwargs.values()]:
        if isinstance(value, dist.ProcessGroup):
            return value.size()
        if type(value).__name__ == "ScriptObject":  # how a c10d op receives its ProcessGroup
            try:
                return dist.ProcessGroup.unbox(value).size()
            except (RuntimeError, TypeError, AttributeError):
                continue
        if isinstance(value, str) and value not in ("sum", "avg", "max", "min", "product"):
            try:
                return dist.distributed_c10d._resolve_process_group(value).size()
            except (KeyError, RuntimeError, ValueError):
                continue
    return world_size


def per_step(cfg: dict, params: int, param_tensors: int, boundary_bytes_per_sample: float | None) -> list[dict]:
    """The collectives of the strategies not traced: DDP's bucketed all-reduce of the gradients (fp32, as the
    weights), ZeRO's plus the broadcast of each parameter from the rank that stepped it, the pipeline's sends
    of activations and of their gradients at every stage boundary and micro-batch (this rank's share of the
    step's critical path: see `bench.plan.steptime`)."""
    name, degrees = cfg["strategy"]["name"], cfg["parallel"]
    grad_bytes = 4.0 * params
    out = []
    if name in ("ddp", "zero") and degrees["dp"] > 1:
        cap = cfg["strategy"].get("bucket_cap_mb", 25) * 2**20
        # DDP's first bucket is capped at 1 MiB (torch's _DEFAULT_FIRST_BUCKET_BYTES), the rest at bucket_cap_mb
        buckets = 1 + math.ceil(max(grad_bytes - 2**20, 0) / cap)
        # once per step whatever grad_accum: the micro-batches before the last run under no_sync
        out.append({"collective": "all_reduce", "ranks": degrees["dp"], "calls": buckets, "bytes": grad_bytes})
    if name == "zero" and degrees["dp"] > 1:
        out.append({"collective": "broadcast", "ranks": degrees["dp"], "calls": param_tensors,
                    "bytes": grad_bytes})
    if name == "pipeline" and degrees["pp"] > 1 and boundary_bytes_per_sample:
        # each of the rank's stages (looped: stages_per_rank of them) sends an activation forward and a gradient
        # back per micro-batch
        micro, stages = cfg["strategy"]["microbatches"], cfg["strategy"].get("stages_per_rank", 1)
        per_micro = boundary_bytes_per_sample * cfg["global_batch"] // degrees["dp"] // micro
        sends = 2 * micro * stages
        out.append({"collective": "p2p", "ranks": 2, "calls": sends, "bytes": sends * per_micro})
    if name == "pipeline" and degrees["dp"] > 1:  # a stage's gradients, one flat all-reduce over its replicas
        stage_grads = grad_bytes / degrees["pp"]
        out.append({"collective": "all_reduce", "ranks": degrees["dp"], "calls": 1, "bytes": stage_grads})
    return out


def model_sizes(model_cfg: dict) -> dict:
    """Trainable parameters and parameter tensors, and the largest activation a block hands the next one per
    sample (what a pipeline stage sends), from the model built on fake tensors: nothing is allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.models import build_model, model_blocks, model_spec

    x, _ = model_spec(model_cfg).synthetic_batch(model_cfg, 1, torch.Generator().manual_seed(0))
    sent: list[float] = []
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model = build_model(model_cfg)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for block in model_blocks(model, model_cfg):
            block.register_forward_hook(lambda _m, _i, out: sent.append(_bytes(
                [t for t in _flat([out]) if isinstance(t, torch.Tensor)])))
        with torch.no_grad():
            model(mode.from_tensor(x))
    return {"params": sum(p.numel() for p in trainable), "param_tensors": len(trainable),
            "boundary_bytes_per_sample": max(sent, default=0.0)}
