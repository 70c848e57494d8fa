"""Start the ranks of one run with torchrun's machinery and report how they ended."""

from __future__ import annotations

import logging
import os
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


def launch_local(cfg: dict, run_dir: Path) -> LaunchOutcome:
    """`launch.nproc` ranks on this node: `python -m bench.worker <run_dir>` under elastic_launch."""
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
    return run_agent(lambda: elastic_launch(config, sys.executable)("-u", "-m", "bench.worker", str(run_dir)), cfg)


def run_agent(start: Callable[[], object], cfg: dict) -> LaunchOutcome:
    """Run torchrun's agent until the ranks end, fail, time out or the controller is signalled.

    In every case but success the agent has stopped all ranks (SIGTERM, then SIGKILL) before this returns.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

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
    return LaunchOutcome("ok")


def _describe(failure) -> str:
    """A failed rank in one line: the exception message its error file recorded, else its exit code."""
    message = failure.message
    if isinstance(message, dict):  # the worker's @record error file
        message = message.get("message") or str(message)
    if not message or message.startswith("To enable traceback"):
        message = f"exited with code {failure.exitcode}"
    return " ".join(str(message).split())[:1000]
