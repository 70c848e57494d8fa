"""Turning per-rank, per-step measurements into the numbers of one run. Pure Python: unit-testable."""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def step_time_stats_ms(step_times_s: list[float]) -> dict[str, float]:
    """Mean, percentiles and spread of measured step times, in milliseconds (std: sample, n-1)."""
    ms = [t * 1e3 for t in step_times_s]
    n = len(ms)
    mean = sum(ms) / n
    std = math.sqrt(sum((t - mean) ** 2 for t in ms) / (n - 1)) if n > 1 else 0.0
    return {
        "step_time_ms_mean": mean,
        "step_time_ms_p50": percentile(ms, 50),
        "step_time_ms_p90": percentile(ms, 90),
        "step_time_ms_p99": percentile(ms, 99),
        "step_time_ms_std": std,
        "step_time_ms_min": min(ms),
        "step_time_ms_max": max(ms),
    }


def max_over_ranks(per_rank: list[list[float]]) -> list[float]:
    """A step is done when its slowest rank is done: the step's time is the max over ranks."""
    lengths = {len(r) for r in per_rank}
    if len(lengths) != 1:
        raise ValueError(f"ranks recorded different numbers of steps: {sorted(lengths)}")
    return [max(step) for step in zip(*per_rank, strict=True)]


def mean_over_ranks(per_rank: list[list[float]]) -> list[float]:
    """The global-batch loss: every data-parallel shard has the same size, so the mean of shard losses."""
    return [sum(step) / len(step) for step in zip(*per_rank, strict=True)]


def throughput(global_batch: int, step_times_s: list[float], tokens_per_sample: int | None) -> dict:
    """Samples (and tokens) per second over the measured steps: work done / time taken."""
    samples_per_s = global_batch * len(step_times_s) / sum(step_times_s)
    return {
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * tokens_per_sample if tokens_per_sample else None,
    }
