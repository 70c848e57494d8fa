"""DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets during backward."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench.optim import build_optimizer
from bench.strategies import Parallel
from bench.topology import Topology


def apply(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    model = model.to(topo.device)
    device_ids = [topo.local_rank] if topo.device.startswith("cuda") else None
    ddp = DistributedDataParallel(model, device_ids=device_ids)
    return Parallel(module=ddp, optimizer=build_optimizer(ddp.parameters(), cfg["optim"]))
