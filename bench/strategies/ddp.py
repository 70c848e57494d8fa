"""DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets during backward."""

from __future__ import annotations

import math

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bench.errors import positive_number, reject
from bench.parallel.topology import Degrees, Topology
from bench.strategies import Memory, as_one_replica, collective
from bench.strategies.base import Parallel, checkpoint_and_compile, optimizer_for

OVERLAP = True  # buckets are all-reduced while backward goes on

FIRST_BUCKET_BYTES = 2**20  # torch's _DEFAULT_FIRST_BUCKET_BYTES: DDP's first bucket is capped at 1 MiB


SWITCHES = ("gradient_as_bucket_view", "static_graph", "find_unused_parameters")


def check(cfg: dict) -> None:
    """DDP's own keys: torch takes `bucket_cap_mb=true` as 1 MB and `static_graph=1` as on."""
    strategy = cfg["strategy"]
    if not positive_number(strategy["bucket_cap_mb"]):
        reject("strategy.bucket_cap_mb", "a finite number of MB > 0", strategy["bucket_cap_mb"])
    for key in SWITCHES:
        if not isinstance(strategy[key], bool):
            reject(f"strategy.{key}", "true or false", strategy[key])


def layouts(world: int, ranks_per_node: int | None) -> list[Degrees]:
    return [Degrees(dp=world)] if world > 1 else []


def memory(run) -> Memory:
    """DDP's C++ reducer needs real storage, so one replica (strategy=single on its share of the batch) is
    simulated, plus the reducer's buckets: a flat copy of the gradients, unless they alias it."""
    knobs = run.config["strategy"]
    return as_one_replica(gradient_buckets=run.degrees.dp > 1 and not knobs["gradient_as_bucket_view"])


def collectives(run, sizes) -> list[dict]:
    return [gradient_all_reduce(run, sizes, run.config["strategy"]["bucket_cap_mb"])] if run.degrees.dp > 1 else []


def gradient_all_reduce(run, sizes, bucket_cap_mb: float) -> dict:
    """The fp32 gradients all-reduced in buckets, once per step whatever grad_accum (the micro-batches before the
    last run under no_sync)."""
    grad_bytes = 4.0 * sizes.params
    buckets = 1 + math.ceil(max(grad_bytes - FIRST_BUCKET_BYTES, 0) / (bucket_cap_mb * 2**20))
    return collective("all_reduce", run.degrees.dp, buckets, grad_bytes)


def apply(model: nn.Module, topo: Topology, run) -> Parallel:
    knobs = run.config["strategy"]
    model = checkpoint_and_compile(run.materialize(model, topo.device), run)
    ddp = DistributedDataParallel(
        model,
        device_ids=[topo.local_rank] if topo.device_type == "cuda" else None,
        bucket_cap_mb=knobs["bucket_cap_mb"],
        gradient_as_bucket_view=knobs["gradient_as_bucket_view"],
        static_graph=knobs["static_graph"],
        find_unused_parameters=knobs["find_unused_parameters"],
    )
    return Parallel.build(ddp, optimizer_for(ddp.parameters(), run), topo, run)
