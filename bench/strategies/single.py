"""One process, one device: the baseline every other strategy is compared with."""

from __future__ import annotations

from torch import nn

from bench.models import materialize_model
from bench.rank.optim import build_optimizer
from bench.rank.topology import Topology
from bench.strategies.parallel import Parallel, checkpoint_and_compile

SINGLE_PROCESS = True


def apply(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    model = checkpoint_and_compile(materialize_model(model, cfg, topo.device), cfg)
    return Parallel.build(model, build_optimizer(model.parameters(), cfg["optim"]), topo, cfg)
