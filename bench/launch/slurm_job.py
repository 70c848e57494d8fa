"""A submitted SLURM job, watched from the controller (`launch=slurm`): its state asked of SLURM (sacct), its
tasks' results read from submitit's files, rank 0's log streamed, and the controller's signals turned into an
exception submitit cannot swallow."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from bench.launch import lost_a_peer

SETTLE_S = 120  # after the tasks' results (or scancel), how long to wait for SLURM to report that the job ended


class Interrupted(BaseException):
    """Like KeyboardInterrupt, a BaseException: submitit swallows every Exception raised while it calls sacct."""

    def __init__(self, signum: int):
        self.signum = signum


@contextmanager
def raise_on_signals():
    def handler(signum, frame):
        raise Interrupted(signum)

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


class Tail:
    """Print the lines a growing file gets, prefixed (rank 0's log, while the job runs)."""

    def __init__(self, path: Path, prefix: str):
        self.path, self.prefix, self.offset = path, prefix, 0

    def flush(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only
        for line in data[:end].decode(errors="replace").splitlines():
            print(f"{self.prefix}{line}", file=sys.stderr, flush=True)
        self.offset += end


def refresh(job) -> None:
    """Ask SLURM (sacct) now: submitit would otherwise ask less and less often (up to every 10 minutes)."""
    try:
        job.get_info(mode="force")
    except Exception:  # sacct unavailable: submitit already warned; the deadline is the backstop
        pass


INCOMPLETE = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING")
UNKNOWN_S = 15  # how long to wait for a state when sacct knows nothing of the job (no accounting?)


def settle(job) -> None:
    """Wait (a while) until SLURM says the job ended, not just that every task wrote its result: then no rank
    outlives the run's row, the next job of a sweep starts on free nodes, and the state is final. Ended means
    both: accounting's final state, and the job gone from the queue (accounting says CANCELLED while the queue
    still lists the job completing, its processes being ended: seen here after scancel)."""
    start = time.monotonic()
    while time.monotonic() - start < SETTLE_S:
        refresh(job)
        state = str(job.state).upper()
        if state.startswith("UNKNOWN") and time.monotonic() - start > UNKNOWN_S:
            return
        if not state.startswith(INCOMPLETE + ("UNKNOWN",)) and not in_queue(str(job.job_id)):
            return
        time.sleep(1.0)


def in_queue(job_id: str) -> bool:
    """Whether `squeue` still lists the job (False where there is no squeue to ask: a local cluster)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def task_errors(job) -> dict[int, str]:
    """rank -> the exception it raised (from submitit's result files), the cause first: the earliest that is
    not a rank losing its peer (under load the peer's error file can be written before the cause's)."""
    from submitit.core.utils import pickle_load

    found = []
    for task_id in range(job.num_tasks):
        path = job.task(task_id).paths.result_pickle
        try:
            kind, value = pickle_load(path)
        except (OSError, EOFError, ValueError):  # no result: the task was killed, or is still writing it
            continue
        if kind == "error":
            lines = [line for line in str(value).strip().splitlines() if line.strip()]
            found.append((path.stat().st_mtime, task_id, " ".join((lines or ["error"])[-1].split())[:1000]))
    return {task_id: message for _, _, task_id, message in sorted((lost_a_peer(m), t, i, m) for t, i, m in found)}


def task_successes(job) -> int:
    from submitit.core.utils import pickle_load

    ok = 0
    for task_id in range(job.num_tasks):
        try:
            kind, _ = pickle_load(job.task(task_id).paths.result_pickle)
        except (OSError, EOFError, ValueError):
            continue
        ok += kind == "success"
    return ok
