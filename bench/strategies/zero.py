"""ZeRO-1: DDP for the gradients, `ZeroRedundancyOptimizer` sharding the optimizer state over the ranks
(each rank steps its shard of the parameters, then broadcasts them)."""

from __future__ import annotations

from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from bench.errors import reject
from bench.parallel.optim import optimizer_class
from bench.parallel.topology import Degrees, Topology
from bench.strategies import Memory, as_one_replica, collective
from bench.strategies.base import Parallel, checkpoint_and_compile
from bench.strategies.ddp import gradient_all_reduce

OVERLAP = True
BUCKET_CAP_MB = 25  # DDP's default, which this strategy keeps


def check(cfg: dict) -> None:
    if cfg["strategy"]["overlap_with_ddp"] and cfg["device"] != "cuda":
        reject("strategy.overlap_with_ddp", "false on gloo/CPU (torch warns that overlapping ZeRO with DDP "
               "on gloo may meet hangs); it is allowed with nccl on CUDA", True)
    if cfg["strategy"]["overlap_with_ddp"] and cfg["grad_accum"] > 1:
        reject("grad_accum", "1 with strategy.overlap_with_ddp=true (the optimizer steps inside the all-reduce)",
               cfg["grad_accum"])


def layouts(world: int, ranks_per_node: int | None) -> list[Degrees]:
    return [Degrees(dp=world)] if world > 1 else []


def memory(run) -> Memory:
    """One replica, its optimizer state divided over the data-parallel ranks, plus DDP's gradient buckets."""
    dp = run.degrees.dp
    return as_one_replica(optimizer_shards=dp, gradient_buckets=dp > 1)


def collectives(run, sizes) -> list[dict]:
    """DDP's all-reduce, then each parameter broadcast from the rank that stepped it."""
    if run.degrees.dp == 1:
        return []
    return [gradient_all_reduce(run, sizes, BUCKET_CAP_MB),
            collective("broadcast", run.degrees.dp, sizes.param_tensors, 4.0 * sizes.params)]


def apply(model: nn.Module, topo: Topology, run) -> Parallel:
    overlap = run.config["strategy"]["overlap_with_ddp"]
    model = checkpoint_and_compile(run.materialize(model, topo.device), run)
    ddp = DistributedDataParallel(model, device_ids=[topo.local_rank] if topo.device_type == "cuda" else None)
    cls, kwargs = optimizer_class(run.config["optim"])
    zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls, overlap_with_ddp=overlap, **kwargs)
    if overlap:
        from torch.distributed.algorithms.ddp_comm_hooks.ddp_zero_hook import hook_with_zero_step
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp.register_comm_hook(None, hook_with_zero_step(allreduce_hook, ddp, zero))
    return Parallel.build(ddp, zero, topo, run, extra={"zero_stage": 1, "overlap_with_ddp": overlap})
