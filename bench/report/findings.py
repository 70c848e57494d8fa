"""The report's answer first: for each objective (throughput, peak memory, MFU), which configuration is best,
by how much, and why, in one sentence each. A pure function of the summary (`table.summarize`, then
`scaling.add_scaling`), over the ok configurations only, named by the labels the figures use.

Configurations are compared within a model: samples of two models are not the same work. The reasons are
the row's own fields: exposed communication where the runs were profiled (`profile=true`, else a hint to
profile), a pipeline's predicted bubble, scaling efficiency; for memory, the kind of memory that differs most
from the heaviest configuration. When the first two of a throughput or MFU ranking have overlapping 95 %
confidence intervals (of the mean over repeats), no winner is named: the repeats cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pandas as pd

from bench.report.figure_data import MEMORY_PART_NAMES
from bench.report.labels import config_label, ok_lines

THROUGHPUT, MEMORY, MFU = "throughput", "memory", "MFU"
PROFILE_HINT = "run with profile=true to see where its time goes"
PEAK_SOURCES = {"measured": "the measured matmul peak", "given": "the given peak_tflops", "table": "the datasheet peak"}


@dataclass(frozen=True)
class Finding:
    objective: str  # THROUGHPUT, MEMORY or MFU
    best: str | None  # the best configuration's label; None when no single one is
    text: str  # one sentence


def findings(summary: pd.DataFrame) -> list[Finding]:
    """Per model with two ok configurations or more: the fastest, the lightest and (when the rows have MFU)
    the most efficient configuration."""
    found = []
    for _, group in ok_lines(summary).groupby("model", sort=False):
        if len(group) > 1:
            candidates = [fastest(group, summary), least_memory(group, summary), best_mfu(group, summary)]
            found += [finding for finding in candidates if finding is not None]
    return found


# --- throughput ---------------------------------------------------------------------------------------------


def fastest(group: pd.DataFrame, summary: pd.DataFrame) -> Finding:
    """Highest median tokens/s (samples/s where a configuration lacks tokens)."""
    by_tokens = group["tokens_per_s"].notna().all()
    column, unit = ("tokens_per_s", "tokens/s") if by_tokens else ("samples_per_s", "samples/s")
    ranked = group.sort_values(column, ascending=False, kind="stable")
    first, second, slowest = ranked.iloc[0], ranked.iloc[1], ranked.iloc[-1]
    name = partial(config_label, frame=summary)
    the_slowest = f"the slowest, {name(slowest)}" + _which(slowest) if len(ranked) > 2 else ""
    if _within_noise(first, second, column):
        text = (
            f"Throughput: no clear winner between {name(first)} ({_amount(first[column], unit)}) and "
            f"{name(second)} ({_amount(second[column], unit)}): their 95 % confidence intervals overlap, so more "
            "repeats are needed to rank them"
        )
        if the_slowest:
            text += f"; both are at least {_faster(second[column], slowest[column])} {the_slowest}"
        profiled = pd.notna(first["comm_exposed_pct"]) and pd.notna(second["comm_exposed_pct"])
        return Finding(THROUGHPUT, None, text + ("" if profiled else f"; {PROFILE_HINT}") + ".")
    text = (
        f"Throughput: {name(first)} is fastest at {_amount(first[column], unit)} (median), "
        f"{_faster(first[column], second[column])} {name(second)}"
    )
    if the_slowest:
        text += f" and {_faster(first[column], slowest[column])} {the_slowest}"
    reasons = _reasons(first)
    if reasons:
        text += f"; it {_joined(reasons)}"
    if pd.isna(first["comm_exposed_pct"]):
        text += f"; {PROFILE_HINT}"
    return Finding(THROUGHPUT, name(first), text + _unrepeated(first, second) + ".")


def _which(line: pd.Series) -> str:
    """`, which exposes ... and scales at ...`: why `line` is slow, from its own row ("" when it says nothing)."""
    reasons = _reasons(line)
    return f", which {_joined(reasons)}" if reasons else ""


def _reasons(line: pd.Series) -> list[str]:
    """What the row says about its speed, as verb phrases: the communication that compute did not hide (profiled
    runs), the pipeline's predicted bubble, the scaling efficiency."""
    reasons = []
    if pd.notna(line["comm_exposed_pct"]):
        reasons.append(f"exposes {line['comm_exposed_pct']:.1f} % of its profiled step as communication")
    bubble = line["bubble_fraction"]
    if pd.notna(bubble) and bubble > 0:
        reasons.append(f"loses {100 * bubble:.0f} % of its schedule to the pipeline bubble (predicted)")
    for kind in ("strong", "weak"):
        efficiency = line[f"efficiency_{kind}"]
        if line["devices"] > 1 and pd.notna(efficiency):
            reasons.append(f"scales at {100 * efficiency:.0f} % {kind}-scaling efficiency on {line['devices']} devices")
            break
    return reasons


def _joined(phrases: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"


# --- memory -------------------------------------------------------------------------------------------------


def least_memory(group: pd.DataFrame, summary: pd.DataFrame) -> Finding | None:
    """Lowest peak memory (max over ranks), with the kind of memory that makes the difference to the heaviest."""
    measured = group[group["peak_mem_mb"].notna()]
    if len(measured) < 2:
        return None
    name = partial(config_label, frame=summary)
    lightest = measured.loc[measured["peak_mem_mb"].idxmin()]
    heaviest = measured.loc[measured["peak_mem_mb"].idxmax()]
    low, high = lightest["peak_mem_mb"], heaviest["peak_mem_mb"]
    if low == high:
        return Finding(MEMORY, None, f"Memory: every configuration peaks at {_mb(low)} per rank.")
    tied_low = _others((measured["peak_mem_mb"] == low).sum() - 1, "tied with")
    tied_high = _others((measured["peak_mem_mb"] == high).sum() - 1, "and")
    text = (
        f"Memory: {name(lightest)}{tied_low} peaks lowest at {_mb(low)} per rank, {100 * (1 - low / high):.0f} % "
        f"below the heaviest, {name(heaviest)}{tied_high} at {_mb(high)}"
    )
    kind = _most_different_kind(lightest, heaviest)
    if kind:
        amounts = f"{_mb(lightest[kind])} against {_mb(heaviest[kind])}"
        text += f"; the biggest difference is its {MEMORY_PART_NAMES[kind]}: {amounts}"
    return Finding(MEMORY, name(lightest), text + ".")


def _most_different_kind(lightest: pd.Series, heaviest: pd.Series) -> str | None:
    """The memory kind (MEMORY_PART_NAMES) in which the two differ most, in MB; None when the rows lack kinds."""
    gaps = {
        kind: abs(heaviest[kind] - lightest[kind])
        for kind in MEMORY_PART_NAMES
        if kind in lightest and pd.notna(lightest[kind]) and pd.notna(heaviest[kind])
    }
    return max(gaps, key=gaps.get) if gaps and max(gaps.values()) > 0 else None


def _others(count: int, joint: str) -> str:
    return f" ({joint} {count} other{'s' if count > 1 else ''})" if count else ""


# --- MFU ----------------------------------------------------------------------------------------------------


def best_mfu(group: pd.DataFrame, summary: pd.DataFrame) -> Finding | None:
    """Highest MFU among the configurations whose rows have it; None when fewer than two have it."""
    measured = group[group["mfu_pct"].notna()]
    if len(measured) < 2:
        return None
    ranked = measured.sort_values("mfu_pct", ascending=False, kind="stable")
    first, second = ranked.iloc[0], ranked.iloc[1]
    name = partial(config_label, frame=summary)
    counted = _mfu_convention(first)
    if _within_noise(first, second, "mfu_pct"):
        text = (
            f"MFU: no clear winner between {name(first)} ({first['mfu_pct']:.1f} %) and {name(second)} "
            f"({second['mfu_pct']:.1f} %): their 95 % confidence intervals overlap{counted}."
        )
        return Finding(MFU, None, text)
    text = (
        f"MFU: {name(first)} makes the best use of its devices at {first['mfu_pct']:.1f} % MFU, against "
        f"{second['mfu_pct']:.1f} % for {name(second)}{counted}{_unrepeated(first, second)}."
    )
    return Finding(MFU, name(first), text)


def _mfu_convention(line: pd.Series) -> str:
    """e.g. ` (model FLOPs by 6NT + 12LT^2d (PaLM, ...), against the measured matmul peak)`."""
    parts, convention = [], line["flops_convention"]
    if isinstance(convention, str):  # its first clause names it; summary.csv has the whole text
        parts.append(f"model FLOPs by {convention.split(':')[0]}")
    if line["peak_source"] in PEAK_SOURCES:
        parts.append(f"against {PEAK_SOURCES[line['peak_source']]}")
    return f" ({', '.join(parts)})" if parts else ""


# --- shared -------------------------------------------------------------------------------------------------


UNREPEATED = "; {} ran once, so no interval tells this lead from run-to-run noise (repeats=3 gives one)"


def _unrepeated(first: pd.Series, second: pd.Series) -> str:
    """A ranking's caveat where the first or second ran once: a single run has no confidence interval."""
    once = [line for line in (first, second) if line["ok_runs"] < 2]
    return UNREPEATED.format("each" if len(once) == 2 else "one of the two") if once else ""


def _within_noise(first: pd.Series, second: pd.Series, column: str) -> bool:
    """Whether the 95 % confidence intervals of the two overlap (a configuration of one run has none)."""
    return _interval(first, column)[0] <= _interval(second, column)[1]


def _interval(line: pd.Series, column: str) -> tuple[float, float]:
    """The 95 % CI of `column`: the throughput's, scaled (tokens/s and MFU are samples/s times a constant of
    the configuration); the value alone without one."""
    value, low, high = line[column], line["samples_per_s_ci95_low"], line["samples_per_s_ci95_high"]
    if pd.isna(low) or pd.isna(high):
        return value, value
    scale = value / line["samples_per_s"]
    return low * scale, high * scale


def _faster(a: float, b: float) -> str:
    """How `a` compares with `b` (a >= b): `12 % faster than`, `2.6× as fast as`."""
    ratio = a / b
    if ratio >= 2:
        return f"{ratio:.1f}× as fast as"
    gain = 100 * (ratio - 1)
    return f"{gain:.1f} % faster than" if gain < 10 else f"{gain:.0f} % faster than"


def _amount(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.1f} {unit}"


def _mb(value: float) -> str:
    return _amount(value, "MB")
