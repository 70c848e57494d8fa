"""Launchers: how the ranks of one run start, and how they ended.

`conf/launch/<name>.yaml` selects `bench/launch/<name>.py`; the scripts a cluster user copies live in the
top-level `launch/` folder. Every launcher module defines

    launch(cfg, run_dir, worker) -> LaunchOutcome

which starts `worker` on this node's ranks (`launch=inline`: in this very process), waits until they end, fail,
time out or the controller is signalled, and says how (`LaunchOutcome`). A launcher reads no results: the
controller that called it does. The other modules here are what launchers share: `agent` (torchrun's agent,
for local and multinode), `process` (deadline, signals, environment), `world` (what torchrun and srun tell a
process) and `checks` (the launch group's keys).
"""

from __future__ import annotations

import importlib
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

NAMES = ("local", "multinode", "inline", "slurm")


@dataclass(frozen=True)
class Worker:
    """What every rank runs: `python -m <module> <run_dir>` in a process of its own (local, multinode), or
    `<module>.<function>(run_dir)` in a process someone else started (inline, a SLURM task)."""

    module: str
    function: str

    def run(self, run_dir: Path) -> None:
        getattr(importlib.import_module(self.module), self.function)(run_dir)


@dataclass
class LaunchOutcome:
    status: str  # ok | failed | timeout | interrupted (how the launch ended, before looking at results)
    failed_ranks: dict[int, str] = field(default_factory=dict)  # rank -> what ended it, first failure first
    detail: str | None = None  # what the controller did: the timeout, the signal it received
    signal: int | None = None  # the signal that interrupted the controller
    # False on the nodes of a multi-node job that do not hold global rank 0 (and on inline ranks other than
    # 0): their controller records no row, the node holding rank 0 does.
    records_row: bool = True
    note: str | None = None  # what a controller that records no row tells its user
    slurm_job_id: str | None = None  # the SLURM job that ran the ranks (launch=slurm)
    launch_id: str | None = None  # stamped on every result file this launch wrote: the controller reads only those
    extra_fields: dict = field(default_factory=dict)  # what the launcher learned for the row (where ranks hung)

    @property
    def first_failed_rank(self) -> int | None:
        return next(iter(self.failed_ranks), None)

    @property
    def error(self) -> str | None:
        parts = ([self.detail] if self.detail else []) + [f"rank {r}: {why}" for r, why in self.failed_ranks.items()]
        return "; ".join(parts) or None


OOM_MARKERS = ("OutOfMemoryError", "out of memory", "MemoryError", "can't allocate memory")  # CUDA, Python, CPU

# What a rank says when a peer left under it (gloo's and NCCL's words): a consequence, not the cause.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker", "Broken pipe",
             "NCCL communicator")


def lost_a_peer(message: str) -> bool:
    return any(words in message for words in PEER_LOST)


def failure_status(outcome: LaunchOutcome) -> str:
    """The status of a run without results: `oom` when its first failure ran out of memory, else how the
    launch ended."""
    if outcome.status == "failed":
        first = outcome.failed_ranks.get(outcome.first_failed_rank, "")
        return "oom" if any(marker in first for marker in OOM_MARKERS) else "failed"
    return outcome.status


# What a launch's ranks leave in the run folder. Before a launch from this machine alone, earlier ones are removed:
# a reused folder (a fixed hydra.run.dir, a sweep folder given twice) must never lend its results to a new run.
RESULT_FILES = ("ranks", "params.pt", "steps.csv", "row.json", "comm.json", "pids", "stacks", "collectives")


def launch(cfg: dict, run_dir: Path, worker: Worker) -> LaunchOutcome:
    """Start the run's ranks with the launcher `launch.name` names, under a new launch id that every result file
    they write carries (see `bench.rank.runtime.stamped`)."""
    from bench.launch.process import environment
    from bench.rank.runtime import LAUNCH_ID_ENV

    name = cfg["launch"]["name"]
    if name in ("local", "slurm"):  # multinode and inline folders are shared with other nodes and ranks by design
        for entry in RESULT_FILES:
            path = run_dir / entry
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    launch_id = uuid.uuid4().hex
    with environment({LAUNCH_ID_ENV: launch_id}):
        outcome = importlib.import_module(f"bench.launch.{name}").launch(cfg, run_dir, worker)
    outcome.launch_id = launch_id
    return outcome
