"""Figures with a horizontal bar (or box) per configuration, drawn from their frames (see `figure_data`):
peak memory, step-time distribution, step-time breakdown and the baseline-vs-candidate comparison.

Figures are `matplotlib.figure.Figure` objects (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from bench.report.draw_style import bar_height
from bench.report.figure_data import MEMORY_PART_NAMES

MEMORY_PART_LOOKS = {
    **{column: (name, f"C{i}") for i, (column, name) in enumerate(MEMORY_PART_NAMES.items())},
    "rest_mb": ("rest of the peak", "0.8"),
}
BREAKDOWN_LOOKS = {
    "compute_comm_ms": ("compute + communication", "C0"),
    "data_wait_ms": ("data wait", "C1"),
    "rank_imbalance_ms": ("waiting for the slowest rank", "C3"),
}

TIME_BREAKDOWN_LOOKS = {
    "compute_only_ms": ("compute", "C0"),
    "comm_hidden_ms": ("communication hidden by compute", "C9"),
    "comm_exposed_ms": ("communication exposed", "C3"),
    "data_wait_ms": ("data wait", "C1"),
    "idle_ms": ("idle", "0.8"),
}


def memory_measure(devices: set, tracked: bool) -> str:
    """What peak memory means for these runs: the tensors a rank holds at a step's peak (rows that carry the
    tracked breakdown), else, in rows of older versions, what their devices measured (`device`: cpu, cuda)."""
    if tracked:
        return "tensors held per rank at a step's peak (torch MemTracker)"
    return {
        frozenset({"cpu"}): "peak RSS per rank, CPU",
        frozenset({"cuda"}): "peak allocated CUDA memory per rank",
    }.get(frozenset(devices), "peak memory per rank (CUDA: allocated; CPU: RSS)")


def draw_memory(data: pd.DataFrame, colors: dict[str, str], measure: str) -> Figure:
    """`memory_data`: the peak per configuration, stacked into what the rank holds when the frame has the
    parts, else one bar coloured by `colors` (label -> colour)."""
    fig = Figure(figsize=(9, bar_height(len(data))), layout="constrained")
    ax = fig.subplots()
    positions = list(range(len(data)))[::-1]
    parts = [column for column in MEMORY_PART_LOOKS if column in data]
    if parts:
        left = [0.0] * len(data)
        for column in parts:
            name, color = MEMORY_PART_LOOKS[column]
            ax.barh(positions, data[column].tolist(), left=left, label=name, color=color)
            left = [a + b for a, b in zip(left, data[column], strict=True)]
        fig.legend(loc="outside lower center", ncol=len(parts), fontsize="small")
        ends = left
    else:
        ends = data["peak_mem_mb"].tolist()
        ax.barh(positions, ends, color=[colors[label] for label in data["label"]])
    for pos, end, peak in zip(positions, ends, data["peak_mem_mb"], strict=True):
        ax.annotate(
            f"{peak:,.0f} MB", (end, pos), xytext=(3, 0), textcoords="offset points", va="center", fontsize="small"
        )
    ax.set_yticks(positions, data["label"].tolist())
    ax.set_xlim(0, max(ends) * 1.18)
    ax.set_xlabel(f"{measure} (MB, max over ranks)")
    ax.set_title("Peak memory per configuration (median over repeats)")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def draw_step_time(times: pd.DataFrame, colors: dict[str, str]) -> Figure:
    """`step_times` as one box per configuration (label -> colour in `colors`)."""
    groups = list(times.groupby("label", sort=False)["step_time_ms"])
    labels = [label for label, _ in groups]
    fig = Figure(figsize=(9, bar_height(len(groups))), layout="constrained")
    ax = fig.subplots()
    positions = list(range(1, len(groups) + 1))[::-1]
    parts = ax.boxplot(
        [group.tolist() for _, group in groups],
        positions=positions,
        orientation="horizontal",
        widths=0.6,
        patch_artist=True,
        showmeans=True,
        meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 5},
        medianprops={"color": "black", "linewidth": 1.5},
    )
    for patch, median, label in zip(parts["boxes"], parts["medians"], labels, strict=True):
        patch.set_facecolor(colors[label])
        patch.set_alpha(0.55)
        median.set_gid(f"median:{label}")  # lets tests (and scripts) find each box's median line
    ax.set_yticks(positions, labels)
    ax.set_xlabel("step time (ms), slowest rank per step; warm-up excluded, repeats pooled")
    ax.set_title("Step-time distribution (box: quartiles, whiskers: 1.5 IQR, ◇: mean)")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def draw_breakdown(data: pd.DataFrame) -> Figure:
    """`breakdown_data` as stacked bars, each labelled with its total and the two waits."""
    totals = [
        f"{r.step_time_ms_mean:.1f} ms (data {r.data_wait_ms:.2f}, slowest rank {r.rank_imbalance_ms:.2f})"
        for r in data.itertuples()
    ]
    return draw_stacked(data, BREAKDOWN_LOOKS, totals, "Step-time breakdown (mean over measured steps)",
                        "mean step time (ms), warm-up excluded, repeats pooled")


def draw_time_breakdown(data: pd.DataFrame) -> Figure:
    """`time_breakdown_data` as stacked bars, each labelled with its profiled step time and the share of
    its communication that compute hid."""
    totals = [
        f"{r.profile_step_time_ms:.1f} ms"
        + ("" if pd.isna(r.overlap_pct) else f", {r.overlap_pct:.0f}% of communication hidden")
        for r in data.itertuples()
    ]
    return draw_stacked(data, TIME_BREAKDOWN_LOOKS, totals, "Where the step's time goes (profile=true)",
                        "profiled step time (ms, profiler on): median over repeats")


def draw_stacked(data: pd.DataFrame, looks: dict, totals: list[str], title: str, xlabel: str) -> Figure:
    """One horizontal bar per line of `data`, stacked from the columns of `looks` ({column: (label, color)})."""
    fig = Figure(figsize=(9, bar_height(len(data))), layout="constrained")
    ax = fig.subplots()
    positions = list(range(len(data)))[::-1]
    left = [0.0] * len(data)
    for column, (label, color) in looks.items():
        ax.barh(positions, data[column], left=left, label=label, color=color)
        left = [a + b for a, b in zip(left, data[column], strict=True)]
    ax.bar_label(ax.containers[-1], labels=totals, padding=3, fontsize="small")
    ax.set_yticks(positions, data["label"])
    ax.set_xlim(0, max(left) * 1.6)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.legend(loc="outside lower center", ncol=min(len(looks), 5), fontsize="small")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def draw_comparison(data: pd.DataFrame) -> Figure:
    """`comparison_data`: the candidate/baseline ratio per configuration with its spread, in the band of
    its tolerance; regressions red, improvements green."""
    fig = Figure(figsize=(9, bar_height(len(data))), layout="constrained")
    ax = fig.subplots()
    positions = list(range(len(data)))[::-1]
    tolerance = data["tolerance_pct"] / 100
    ax.barh(positions, 2 * tolerance, left=1 - tolerance, height=0.6, color="0.88", label="tolerance (no change)")
    ax.axvline(1.0, color="0.4", linewidth=1)
    colors = {"regression": "C3", "improvement": "C2"}
    for pos, line in zip(positions, data.itertuples(), strict=True):
        color = colors.get(line.verdict, "C0")
        ax.errorbar(line.ratio, pos, xerr=line.ratio_spread, fmt="o", color=color, capsize=4, markersize=7)
        note = f"{line.change_pct:+.1f} % {line.verdict}"
        if pd.notna(line.mem_change_pct) and abs(line.mem_change_pct) >= 1:
            note += f" (memory {line.mem_change_pct:+.1f} %)"
        ax.annotate(
            note,
            (line.ratio + line.ratio_spread, pos),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize="small",
            color=color,
        )
    ax.set_yticks(positions, data["label"])
    reach = max((data["ratio"] - 1).abs().max() + data["ratio_spread"].max(), tolerance.max(), 0.05)
    ax.set_xlim(1 - 1.3 * reach, 1 + 2.2 * reach)
    ax.set_ylim(-0.7, len(data) - 0.3)
    ax.set_xlabel("candidate / baseline throughput (ratio of median samples/s; bar: MAD spread)")
    ax.set_title("Candidate vs baseline per configuration (red: regression, green: improvement)")
    ax.legend(fontsize="small", loc="lower left")
    ax.grid(True, axis="x", alpha=0.3)
    return fig
