"""Input data for the train loop. The contract, checked for every data source by
`tests/unit/test_contracts.py`:

A data source is `bench/data/<name>.py` plus `conf/data/<name>.yaml` (`name: <name>` and its keys). The
module defines

required
    batches(run, topo) -> Iterator[(inputs, targets)]
        This rank's batches, endless, already on its device: its data-parallel shard of the same global
        batches, in the same order, for every strategy and world size (so that runs are comparable and parity
        holds). The samples come from the model's `synthetic_batch` (see `bench.models`); `run` is the resolved
        run (`bench.run.Run`).
optional (default)
    check(cfg) -> None      (accept everything)  refuse bad keys with `bench.errors.reject`, before any launch
    prepare(run) -> None    (nothing)            run once by the controller before any rank starts
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import torch

from bench import group_options
from bench.parallel.topology import Topology


def data_module(name: str) -> ModuleType:
    return importlib.import_module(f"bench.data.{name}")


def data_names() -> list[str]:
    return group_options("data")


def check_data(cfg: dict) -> None:
    getattr(data_module(cfg["data"]["name"]), "check", lambda cfg: None)(cfg)


def prepare_data(run) -> None:
    getattr(data_module(run.config["data"]["name"]), "prepare", lambda run: None)(run)


def build_data(run, topo: Topology) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches; with context parallelism (`parallel.cp`), its share of each sequence: every cp rank
    of a replica reads the same batch and keeps its own chunks (`bench.parallel.context`)."""
    batches = data_module(run.config["data"]["name"]).batches(run, topo)
    return batches if topo.cp == 1 else _sequence_shards(batches, topo.cp, topo.cp_rank)


def _sequence_shards(batches: Iterator, cp: int, rank: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from bench.parallel.context import shard_sequence

    for x, y in batches:
        yield shard_sequence(x, cp, rank), shard_sequence(y, cp, rank)
