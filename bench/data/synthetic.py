"""`data=synthetic`: random inputs and targets generated once, seeded, and kept on the device. Isolates compute
and communication from the input pipeline."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from bench.parallel.topology import Topology


def batches(run, topo: Topology) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Generate `data.num_batches` global batches once (seeded), keep this rank's shard on the device, cycle.

    Every rank generates the same global batches and keeps the slice of its data-parallel group, so
    every strategy and world size trains on the same samples in the same order.
    """
    cfg = run.config
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    per_rank = cfg["global_batch"] // topo.dp
    lo = topo.dp_rank * per_rank
    make = run.model.synthetic_batch
    shards = []
    for _ in range(cfg["data"]["num_batches"]):
        x, y = make(cfg["model"], cfg["global_batch"], gen)
        shards.append((x[lo : lo + per_rank].to(topo.device), y[lo : lo + per_rank].to(topo.device)))
    return itertools.cycle(shards)


def check(cfg: dict) -> None:
    from bench.errors import positive_int

    positive_int(cfg, "data.num_batches")
