"""`profile=true`: a few more steps under torch.profiler, after the timed ones, so that profiling never
touches the timed statistics. Each rank writes its trace to `<run_dir>/traces/rank<N>.json.gz` (Perfetto UI or
chrome://tracing open it) and hands in where its steps' time went (`bench.measure.breakdown`).

With `profile.memory=true` (CUDA), the same steps are also recorded by the CUDA allocator's history:
`<run_dir>/traces/rank<N>_memory.pickle`, for pytorch.org/memory_viz.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from bench.measure.breakdown import DATA_MARK, analyse, load_trace
from bench.rank.train import device_sync
from bench.runfolder import TRACES, rank_file
from bench.strategies.base import Parallel

log = logging.getLogger("bench.rank")

MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept for the snapshot (torch's own example's figure)


def trace_path(run_dir: Path, rank: int) -> Path:
    return rank_file(run_dir, TRACES, rank, ".json.gz")


def profile_steps(parallel: Parallel, batches: Iterator, steps: int, run_dir: Path, rank: int,
                  device: str, memory: bool = False) -> dict:
    """Run `steps` profiled steps (after one unrecorded step that absorbs the profiler's start-up), write the
    trace, and return its analysis: per step, the time by part and the collectives this rank entered."""
    path = trace_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    sync = device_sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    if memory:
        torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                 on_trace_ready=lambda prof: prof.export_chrome_trace(str(path))) as prof:
        for step in range(steps + 1):
            with record_function(DATA_MARK):
                x, y = next(batches)
            parallel.train_step(x, y)
            if step == steps:
                sync()  # the last step's kernels land in the trace, which is written at the next prof.step()
            prof.step()
    if memory:
        torch.cuda.memory._dump_snapshot(str(path.with_name(f"rank{rank}_memory.pickle")))
        torch.cuda.memory._record_memory_history(enabled=None)
    log.info("profiled %d steps: %s (%.1f MB)", steps, path, path.stat().st_size / 2**20)
    return analyse(load_trace(path))
