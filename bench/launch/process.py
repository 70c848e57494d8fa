"""What every launcher does around the ranks it waits for: a deadline, signal handlers put back, and an
environment the ranks inherit and the controller gets back unchanged."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager


class RunTimeout(Exception):
    """Raised in the controller when a run exceeds `timeout_s`; the launcher then stops every rank."""


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


def rank_environment(launch: dict, threads: int) -> dict[str, str]:
    """The variables bench sets for the ranks it starts: their thread count, unbuffered output, and glibc's
    mmap threshold where `launch.malloc_mmap_threshold` asks for one."""
    updates = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if launch.get("malloc_mmap_threshold") is not None:
        # glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, where they still
        # count as RSS; a fixed low threshold hands large frees back to the OS, so peak RSS reflects what a
        # strategy actually holds (FSDP2 read 730-824 MB without it, 406 MB with it).
        updates["MALLOC_MMAP_THRESHOLD_"] = str(launch["malloc_mmap_threshold"])
    return updates
