"""What every launcher does around the ranks it waits for: a deadline, signal handlers put back, and an
environment the ranks inherit and the controller gets back unchanged."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager


class RunTimeout(Exception):
    """Raised in the controller when a run exceeds `timeout_s`; the launcher then stops every rank."""


@contextmanager
def deadline(seconds: float, before_raising=lambda: None):
    """Raise RunTimeout in the main thread after `seconds` (SIGALRM), wherever the launch is waiting; first call
    `before_raising` (while the ranks still run)."""

    def expire(signum, frame):
        before_raising()
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


@contextmanager
def environment(updates: dict[str, str]):
    """Set environment variables for the block (children inherit them), then restore the previous values, so
    that the jobs of a sweep do not leak settings into each other."""
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


def rank_environment(threads: int | None) -> dict[str, str]:
    """The only variables bench sets for the ranks it starts: unbuffered output, and their thread count where
    torchrun would set one (see `bench.launch.agent.threads_per_rank`). Nothing else that could change how
    fast the measured work runs: a rank runs in the environment the user's own training would have."""
    return {"PYTHONUNBUFFERED": "1"} | ({"OMP_NUM_THREADS": str(threads)} if threads is not None else {})
