"""Launchers: how the ranks of one run start, and how they ended. A launcher is one module and one config, and
declares here all that the rest of bench needs of it; nothing outside `bench/launch/` reads its name. The
contract, checked for every launcher by `tests/unit/test_contracts.py`:

A launcher is `bench/launch/<name>.py` plus `conf/launch/<name>.yaml` (`name: <name>`, `nnodes`, `nproc` and its
own keys). The module defines

required
    launch(cfg, run_dir, worker) -> LaunchOutcome
        Start `worker` on this node's ranks (or run it in this very process), wait until they end, fail, time
        out or the controller is signalled, and say how (`LaunchOutcome`). A launcher reads no results: the
        controller that called it does.
optional (default)
    check(cfg) -> None                      (accept everything)
        Refuse, with `bench.errors.reject`, keys of the launch group it cannot honour; it may fill the keys it
        derives (`launch.nproc` from the GPUs asked for, the world from the environment).
    check_here(cfg) -> None                 (accept everything)
        Refuse a machine that cannot use it (no `sbatch` to submit with): run when a run is prepared, not when
        a config is validated, so a config can be valid on a machine that cannot run it.
    RUNS_HERE: bool                         (True)
        Every rank starts on this machine, from this controller: the controller predicts each rank's memory
        and refuses a run that would not fit here.
    SHARES_RUN_FOLDER: bool                 (False)
        Other controllers or ranks use the same run folder at the same time (the other nodes', the other
        ranks'): bench neither clears nor locks it, and the launcher clears what it must.
    run_id(args, env) -> str | None         (none)
        The id every node or rank of a run agrees on without talking to the others, read from the command line
        before Hydra parses it and from the environment: the run folder is named after it
        (`<results_dir>/<launcher>/<id>_<run>`). A launcher with such an id runs once per id: repeats refused.
    RANK_IN_CONTROLLER: bool                (False)
        The controller's process is itself a rank: its C++ warnings and logs stay on.

The other modules here are what launchers share: `agent` (torchrun's agent, for local and multinode),
`process` (deadline, signals, environment), `watch` (results handed in, stacks of hung ranks), `world` (what
torchrun and srun tell a process, the command line before Hydra) and `checks` (keys every launcher has).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from bench import conf_dir, group_options
from bench.errors import reject
from bench.runfolder import LAUNCH_ID_ENV, RESULT_FILES


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


@dataclass(frozen=True)
class LauncherSpec:
    """A launcher module read through its contract, defaults filled in."""

    name: str
    launch: Callable
    check: Callable[[dict], None]
    check_here: Callable[[dict], None]
    runs_here: bool
    shares_run_folder: bool
    run_id: Callable[[list[str], Mapping[str, str]], str | None] | None
    rank_in_controller: bool


def _accept(cfg: dict) -> None:
    return None


def launcher_module(name: str) -> ModuleType:
    return importlib.import_module(f"bench.launch.{name}")


def launcher_spec(name: str) -> LauncherSpec:
    module = launcher_module(name)
    return LauncherSpec(
        name=name,
        launch=module.launch,
        check=getattr(module, "check", _accept),
        check_here=getattr(module, "check_here", _accept),
        runs_here=getattr(module, "RUNS_HERE", True),
        shares_run_folder=getattr(module, "SHARES_RUN_FOLDER", False),
        run_id=getattr(module, "run_id", None),
        rank_in_controller=getattr(module, "RANK_IN_CONTROLLER", False),
    )


def launcher_names() -> list[str]:
    """Every launcher: the options of the config group `launch`."""
    return group_options("launch")


CONTRACT = frozenset({"launch", "check", "check_here", "RUNS_HERE", "SHARES_RUN_FOLDER", "run_id",
                      "RANK_IN_CONTROLLER"})


def check_launch(cfg: dict) -> None:
    """The launch group: the launcher's own keys (it may fill those it derives), then the keys every launcher
    has."""
    from bench.launch.checks import check_common_keys

    name = cfg["launch"]["name"]
    if name not in launcher_names():
        reject("launch", f"one of {', '.join(launcher_names())}", name)
    launcher_spec(name).check(cfg)
    check_common_keys(cfg)


def launch(cfg, run_dir: Path, worker: Worker) -> LaunchOutcome:
    """Start the run's ranks with the launcher `launch.name` names, under a new launch id that every result file
    they write carries (see `bench.runfolder.stamped`). A folder this launch alone uses is first cleared of what
    an earlier launch left in it."""
    from bench.launch.process import environment

    spec = launcher_spec(cfg["launch"]["name"])
    if not spec.shares_run_folder:
        for entry in RESULT_FILES:
            path = run_dir / entry
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    launch_id = uuid.uuid4().hex
    with environment({LAUNCH_ID_ENV: launch_id}):
        outcome = spec.launch(cfg, run_dir, worker)
    outcome.launch_id = launch_id
    return outcome


def one_rank_here(cfg) -> dict:
    """The launch section that runs one rank on this machine, whatever launched `cfg`'s run (the single-device
    reference a `verify=true` run is compared with: on SLURM, on the controller's machine)."""
    import yaml

    local = yaml.safe_load((conf_dir() / "launch" / "local.yaml").read_text())
    return {**local, "nnodes": 1, "nproc": 1, "omp_num_threads": cfg["launch"]["omp_num_threads"]}


def launcher_in(argv: list[str]) -> str | None:
    """The launcher the command line names (its last `launch=` override), None for the config's default."""
    names = [arg.split("=", 1)[1].strip("'\"") for arg in argv if arg.startswith("launch=")]
    return names[-1] if names else None


def quiet_controller_logs(argv: list[str] | None = None) -> None:
    """The controller's own C++ warnings and errors (a store being retried during a rendezvous, each with its
    stack of C++ frames: 134 lines for one unreachable endpoint) stay out of the terminal: bench says in one line
    what failed. torch reads TORCH_CPP_LOG_LEVEL once, when it loads, so the variable is set for the import and
    taken back, and the ranks, which inherit the environment, keep every warning. Not where the controller is
    itself a rank (`RANK_IN_CONTROLLER`)."""
    if "torch" in sys.modules or "TORCH_CPP_LOG_LEVEL" in os.environ:
        return
    name = launcher_in((sys.argv if argv is None else argv)[1:])
    try:
        if name and launcher_spec(name).rank_in_controller:
            return
    except ImportError:  # an unknown launcher: refused later, in one line
        pass
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    import torch  # noqa: F401

    del os.environ["TORCH_CPP_LOG_LEVEL"]
