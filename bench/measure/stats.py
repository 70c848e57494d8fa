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


def slowest_rank_total(per_rank: list[list[float]]) -> float:
    """The time the steps took: the longest of the ranks' own totals over them. Not the sum of the per-step
    maxima: in a synchronous loop one rank's late step k shows up as its peer's long wait in step k+1, and the
    per-step maxima count that hiccup twice (1.4 % over a 2-rank gloo DDP run here), where a loop timed by
    its own clock, as a user's is, counts it once."""
    return max(sum(steps) for steps in per_rank)


def throughput(global_batch: int, steps: int, elapsed_s: float, tokens_per_sample: int | None) -> dict:
    """Samples (and tokens) per second over the measured steps: work done / time taken."""
    samples_per_s = global_batch * steps / elapsed_s
    return {
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * tokens_per_sample if tokens_per_sample else None,
    }


# Student's t quantile t(0.975, df) for df = 1..30 (two-sided 95 %); beyond, its Cornish-Fisher expansion.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def confidence_interval_95(values: list[float]) -> tuple[float, float] | None:
    """95 % confidence interval of the mean of independent repeats: mean ± t(0.975, n-1) · s / sqrt(n), s the
    sample standard deviation. Every repeat is kept (none dropped as best or worst). None for fewer than 2."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_975(n - 1) * s / math.sqrt(n)
    return mean - half, mean + half
