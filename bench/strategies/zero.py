"""ZeRO-1: DDP for the gradients, `ZeroRedundancyOptimizer` sharding the optimizer state over the ranks
(each rank steps its shard of the parameters, then broadcasts them)."""

from __future__ import annotations

from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from bench.checks import reject
from bench.models import materialize_model
from bench.rank.optim import optimizer_class
from bench.rank.topology import Topology
from bench.strategies.parallel import Parallel, checkpoint_and_compile


def check(cfg: dict) -> None:
    if cfg["strategy"]["overlap_with_ddp"] and cfg["device"] != "cuda":
        reject("strategy.overlap_with_ddp", "false on gloo/CPU (torch warns that overlapping ZeRO with DDP "
               "on gloo may meet hangs); it is allowed with nccl on CUDA", True)
    if cfg["strategy"]["overlap_with_ddp"] and cfg["grad_accum"] > 1:
        reject("grad_accum", "1 with strategy.overlap_with_ddp=true (the optimizer steps inside the all-reduce)",
               cfg["grad_accum"])


def apply(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    overlap = cfg["strategy"]["overlap_with_ddp"]
    model = checkpoint_and_compile(materialize_model(model, cfg, topo.device), cfg)
    ddp = DistributedDataParallel(model, device_ids=[topo.local_rank] if topo.device_type == "cuda" else None)
    cls, kwargs = optimizer_class(cfg["optim"])
    zero = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls, overlap_with_ddp=overlap, **kwargs)
    if overlap:
        from torch.distributed.algorithms.ddp_comm_hooks.ddp_zero_hook import hook_with_zero_step
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp.register_comm_hook(None, hook_with_zero_step(allreduce_hook, ddp, zero))
    return Parallel.build(ddp, zero, topo, cfg, extra={"overlap_with_ddp": overlap})
