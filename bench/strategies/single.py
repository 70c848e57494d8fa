"""One process, one device: the baseline every other strategy is compared with."""

from __future__ import annotations

from torch import nn

from bench.parallel.topology import Degrees, Topology
from bench.strategies.base import Parallel, checkpoint_and_compile, optimizer_for

SINGLE_PROCESS = True


def layouts(world: int, ranks_per_node: int | None) -> list[Degrees]:
    return [Degrees()] if world == 1 else []


def apply(model: nn.Module, topo: Topology, run) -> Parallel:
    model = checkpoint_and_compile(run.materialize(model, topo.device), run)
    return Parallel.build(model, optimizer_for(model.parameters(), run), topo, run)
