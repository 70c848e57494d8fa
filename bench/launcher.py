"""Start the ranks of one run with torchrun's machinery and report how they ended.

`launch_local` (one node) and `launch_multinode` (this node's share of a job whose nodes meet at a c10d
rendezvous) run torchrun's agent in the controller; `bench.launch_inline` and `bench.launch_slurm` hold the
other launchers. Every launcher has the signature `(cfg, run_dir, worker_module="bench.worker") ->
LaunchOutcome`; `worker_module` is what each rank runs (`bench.comm_worker` for the collectives benchmark).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("bench.launcher")


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

    @property
    def first_failed_rank(self) -> int | None:
        return next(iter(self.failed_ranks), None)

    @property
    def error(self) -> str | None:
        parts = ([self.detail] if self.detail else []) + [f"rank {r}: {why}" for r, why in self.failed_ranks.items()]
        return "; ".join(parts) or None


class RunTimeout(Exception):
    """Raised in the controller when a run exceeds `timeout_s`; the agent then stops every rank."""


@contextmanager
def deadline(seconds: float):
    """Raise RunTimeout in the main thread after `seconds` (SIGALRM), wherever the launch is waiting."""

    def expire(signum, frame):
        raise RunTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def restored_signal_handlers():
    """torch's agent installs SIGINT/SIGTERM handlers that outlive it; put the previous ones back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def threads_per_rank(nproc: int, requested: int | None) -> int:
    """Split the visible cores between the ranks of this node unless the user chose a number."""
    if requested is not None:
        return requested
    return max(1, len(os.sched_getaffinity(0)) // nproc)


@contextmanager
def worker_environment(cfg: dict):
    """Environment the ranks inherit; restored afterwards so sweep jobs do not leak into each other."""
    launch = cfg["launch"]
    updates = {
        "OMP_NUM_THREADS": str(threads_per_rank(launch["nproc"], launch["omp_num_threads"])),
        "PYTHONUNBUFFERED": "1",
    }
    if launch["malloc_mmap_threshold"] is not None:
        # glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, where they still
        # count as RSS; a fixed low threshold hands large frees back to the OS, so peak RSS reflects what a
        # strategy actually holds (FSDP2 read 730-824 MB without it, 406 MB with it).
        updates["MALLOC_MMAP_THRESHOLD_"] = str(launch["malloc_mmap_threshold"])
    with environment(updates):
        yield


@contextmanager
def environment(updates: dict[str, str]):
    """Set environment variables for the block (children inherit them), then restore the previous values."""
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


WORKER = "bench.worker"


def launch_local(cfg: dict, run_dir: Path, worker_module: str = WORKER) -> LaunchOutcome:
    """`launch.nproc` ranks on this node: `python -m <worker_module> <run_dir>` under elastic_launch."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    launch = cfg["launch"]
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=launch["nproc"],
        run_id=f"bench-{uuid.uuid4().hex[:12]}",
        role="bench",
        # c10d on port 0: the store binds a free port itself, so concurrent runs never collide
        # (torchrun --standalone does the same). The LaunchConfig defaults (etcd, 3 restarts) are wrong here.
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        rdzv_configs={"timeout": launch["rdzv_timeout_s"]},
        max_restarts=0,
        monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=str(run_dir / "torchelastic")),
    )
    return run_agent(lambda: elastic_launch(config, sys.executable)("-u", "-m", worker_module, str(run_dir)), cfg)


RECORDING_BACKEND = "bench-c10d"
_node_ranks: dict[str, int] = {}  # rendezvous id -> the rank this node got in its last rendezvous


def launch_multinode(cfg: dict, run_dir: Path, worker_module: str = WORKER) -> LaunchOutcome:
    """This node's `launch.nproc` ranks of a job over `launch.nnodes` nodes that meet at the c10d rendezvous
    `launch.rdzv_endpoint` under the id `launch.rdzv_id` (torchrun's own protocol, no restarts).

    The same command runs on every node. The nodes' ranks are assigned by the rendezvous; the node that gets
    node rank 0 holds global rank 0, which gathers every rank's results through the process group and
    writes them into *its* run folder (no shared filesystem needed), and only that node's controller records
    the row. A node whose rendezvous never completed records its own failed row.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    launch = cfg["launch"]
    # only a one-node job may leave it unset; `launch.rdzv_id=42` reaches here as an int
    rdzv_id = str(launch["rdzv_id"]) if launch["rdzv_id"] is not None else f"bench-{uuid.uuid4().hex[:12]}"
    # Run folders are named after the rendezvous id, so a reused id finds the previous run's folder: drop its
    # result files. No rank of this run can have written yet: none starts before every node has joined.
    shutil.rmtree(run_dir / "ranks", ignore_errors=True)
    _register_recording_backend()
    _node_ranks.pop(rdzv_id, None)
    config = LaunchConfig(
        min_nodes=launch["nnodes"],
        max_nodes=launch["nnodes"],
        nproc_per_node=launch["nproc"],
        run_id=rdzv_id,
        role="bench",
        rdzv_backend=RECORDING_BACKEND,
        rdzv_endpoint=launch["rdzv_endpoint"],
        rdzv_configs={"join_timeout": launch["rdzv_timeout_s"]},
        max_restarts=0,
        monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=str(run_dir / "torchelastic")),
    )
    outcome = run_agent(lambda: elastic_launch(config, sys.executable)("-u", "-m", worker_module, str(run_dir)), cfg)
    node_rank = _node_ranks.pop(rdzv_id, None)
    if outcome.status == "failed" and outcome.failed_ranks and launch["nnodes"] > 1:
        outcome.detail = (
            "a rank on another node may have failed first (peers then lose their connection): see the other "
            "nodes' output and logs/rank<N>.log in their run folders"
        )
    if node_rank not in (0, None):
        outcome.records_row = False
        outcome.note = (
            f"node rank {node_rank} of {launch['nnodes']} ({outcome.status}); the row is recorded by the node "
            f"holding global rank 0, in its results_dir (run folder {run_dir.name})"
        )
    return outcome


def _register_recording_backend() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(RECORDING_BACKEND, _create_recording_handler)


def _create_recording_handler(params):
    """torch's c10d rendezvous handler, wrapped to note the node rank this node gets (the agent keeps it to
    itself) and to keep a failed rendezvous shutdown at the end of a run from failing the run."""
    from torch.distributed.elastic.rendezvous import (
        RendezvousError,
        RendezvousHandler,
        RendezvousParameters,
        rendezvous_handler_registry,
    )

    inner = rendezvous_handler_registry.create_handler(
        RendezvousParameters(
            backend="c10d",
            endpoint=params.endpoint,
            run_id=params.run_id,
            min_nodes=params.min_nodes,
            max_nodes=params.max_nodes,
            local_addr=params.local_addr,
            **params.config,
        )
    )

    class RecordingHandler(RendezvousHandler):
        def get_backend(self) -> str:
            return RECORDING_BACKEND

        @property
        def use_agent_store(self) -> bool:
            return inner.use_agent_store

        def next_rendezvous(self):
            info = inner.next_rendezvous()
            _node_ranks[inner.get_run_id()] = info.rank
            return info

        def is_closed(self) -> bool:
            return inner.is_closed()

        def set_closed(self):
            return inner.set_closed()

        def num_nodes_waiting(self) -> int:
            # The agent asks this while its ranks run, to let new nodes join (bench never lets them: the world is
            # fixed). When the node hosting the store has ended, the question fails; the agent must then go on
            # watching its own ranks (they end by themselves, or report the lost peers) rather than give up.
            try:
                return inner.num_nodes_waiting()
            except RendezvousError:
                return 0

        def get_run_id(self) -> str:
            return inner.get_run_id()

        def shutdown(self) -> bool:
            try:
                return inner.shutdown()
            except Exception as exc:  # the node hosting the store may have left first: the run is over anyway
                log.warning("rendezvous shutdown failed (harmless once the ranks have ended): %s", exc)
                return False

    return RecordingHandler()


def run_agent(start: Callable[[], object], cfg: dict) -> LaunchOutcome:
    """Run torchrun's agent until the ranks end, fail, time out or the controller is signalled.

    In every case but success the agent has stopped all ranks (SIGTERM, then SIGKILL) before this returns.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    with worker_environment(cfg), restored_signal_handlers():
        try:
            with deadline(cfg["timeout_s"]):
                start()
        except ChildFailedError as exc:
            # The first failure is the cause; the others are usually peers losing their connection to it.
            by_time = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
            return LaunchOutcome("failed", failed_ranks={rank: _describe(failure) for rank, failure in by_time})
        except RunTimeout:
            detail = f"no end after timeout_s={cfg['timeout_s']}: every rank was stopped"
            return LaunchOutcome("timeout", detail=detail)
        except SignalException as exc:
            name = signal.Signals(exc.sigval).name
            return LaunchOutcome("interrupted", detail=f"controller received {name}: ranks stopped", signal=exc.sigval)
        except RendezvousError as exc:
            # e.g. the other nodes never came (wrong endpoint or id, not started): no rank of this node ran
            detail = f"rendezvous failed, no rank started: {type(exc).__name__}: {' '.join(str(exc).split())}"
            if cfg["launch"]["nnodes"] > 1:
                detail += (
                    f" (are the other {cfg['launch']['nnodes'] - 1} node(s) running the same command, with "
                    "the same launch.rdzv_endpoint and launch.rdzv_id?)"
                )
            return LaunchOutcome("failed", detail=detail[:1000])
    return LaunchOutcome("ok")


def _describe(failure) -> str:
    """A failed rank in one line: the exception message its error file recorded, else its exit code."""
    message = failure.message
    if isinstance(message, dict):  # the worker's @record error file
        message = message.get("message") or str(message)
    if not message or message.startswith("To enable traceback"):
        message = f"exited with code {failure.exitcode}"
    return " ".join(str(message).split())[:1000]
