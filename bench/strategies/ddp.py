"""DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets during backward."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench.models import materialize_model
from bench.rank.optim import build_optimizer
from bench.rank.topology import Topology
from bench.strategies.parallel import Parallel, checkpoint_and_compile


def apply(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    knobs = cfg["strategy"]
    model = checkpoint_and_compile(materialize_model(model, cfg, topo.device), cfg)
    ddp = DistributedDataParallel(
        model,
        device_ids=[topo.local_rank] if topo.device_type == "cuda" else None,
        bucket_cap_mb=knobs["bucket_cap_mb"],
        gradient_as_bucket_view=knobs["gradient_as_bucket_view"],
        static_graph=knobs["static_graph"],
        find_unused_parameters=knobs["find_unused_parameters"],
    )
    return Parallel.build(ddp, build_optimizer(ddp.parameters(), cfg["optim"]), topo, cfg)
