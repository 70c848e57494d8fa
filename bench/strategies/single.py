"""One process, one device: the baseline."""

from __future__ import annotations

from torch import nn

from bench.optim import build_optimizer
from bench.strategies import Parallel
from bench.topology import Topology


def apply(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    model = model.to(topo.device)
    return Parallel(module=model, optimizer=build_optimizer(model.parameters(), cfg["optim"]))
