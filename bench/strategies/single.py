"""One process, one device: the baseline."""

from __future__ import annotations

from torch import nn

from bench.config import reject, world_size
from bench.optim import build_optimizer
from bench.strategies import Parallel, checkpoint_and_compile
from bench.topology import Topology

PARITY = "data"
DEGREES = {"dp"}


def check(cfg: dict) -> None:
    if world_size(cfg) != 1:
        reject("launch.nproc", "1 with strategy=single (one process, one device)", cfg["launch"]["nproc"],
               "; or pick a multi-process strategy such as strategy=ddp")


def apply(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    model = checkpoint_and_compile(model.to(topo.device), cfg)
    return Parallel.build(model, build_optimizer(model.parameters(), cfg["optim"]), topo, cfg)
