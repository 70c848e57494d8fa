"""Figures with a row of axes per panel, drawn from their frames (see `figure_data`): throughput and scaling
efficiency against devices (one column per kind of scaling), and loss per step.

Figures are `matplotlib.figure.Figure` objects (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from bench.report import scaling
from bench.report.draw_style import IDEAL_STYLE, LINESTYLES, MARKERS, strategy_colors
from bench.report.figure_data import (
    ScalingSeries,
    ideal_devices,
    ideal_label,
    scaling_axes,
    scaling_kinds,
    scaling_panels,
)
from bench.report.labels import ok_lines, panel_title

KIND_TITLE = {
    scaling.STRONG: "strong scaling (global batch fixed)",
    scaling.WEAK: "weak scaling (batch per replica fixed)",
}


def draw_throughput(data: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """`throughput_data` as samples/s vs devices per series (error bar: std over repeats) with the ideal N·X_1."""
    fig, drawn_axes = _axes_with_data(data, summary, 4.4)
    for ax, _, kind, found, points in drawn_axes:
        for one in found:
            mine = points[points["series"] == one.label]
            x, y, std = (mine[c].tolist() for c in ("devices", "samples_per_s", "samples_per_s_std"))
            ax.errorbar(x, y, yerr=std, label=one.label, capsize=3, **_style(one, summary))
        ideals = ideal_devices(found)
        for base in ideals:
            ideal = points[points["series"] == ideal_label(summary, base)]
            x, y = ideal["devices"].tolist(), ideal["samples_per_s"].tolist()
            ax.plot(x, y, label=ideal_label(summary, base), **IDEAL_STYLE)
            if len(ideals) > 1:  # several grey lines: name each at its end
                ax.annotate(
                    f"ideal, G={summary.at[base, 'global_batch']}",
                    (x[-1], y[-1]),
                    xytext=(-4, 4),
                    textcoords="offset points",
                    ha="right",
                    fontsize="x-small",
                    color="0.35",
                )
        _devices_axis(ax, points["devices"], summary)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("throughput (samples/s)")
        ax.set_title(_axes_title(summary, found, kind))
        ax.legend(fontsize="small")
    fig.suptitle("Throughput vs devices (median over repeats; bars: ±1 std)")
    return fig


def draw_efficiency(data: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """`efficiency_data` as E(N) in % vs devices per series, with the 100 % line; a row of panels shares its
    y scale."""
    fig, drawn_axes = _axes_with_data(data, summary, 4.2)
    for ax, row, kind, found, points in drawn_axes:
        drawn = [one for one in found if one.label in points["series"].unique()]
        for one in drawn:
            mine = points[points["series"] == one.label]
            style = _style(one, summary)
            style["linestyle"] = style["linestyle"] if len(mine) > 1 else "none"
            ax.plot(mine["devices"].tolist(), mine["efficiency_pct"].tolist(), label=one.label, **style)
        ax.axhline(100, label="ideal (100 %)", **IDEAL_STYLE)
        _devices_axis(ax, points["devices"], summary)
        ax.set_ylim(0, max([110.0] + (data.loc[data["panel"] == row, "efficiency_pct"] + 10).tolist()))
        ax.set_ylabel("scaling efficiency (%)")
        ax.set_title(_axes_title(summary, found, kind))
        ax.legend(fontsize="small")
    fig.suptitle("Scaling efficiency E(N) = X_N / (N · X_1), X = median samples/s")
    return fig


def draw_loss(data: pd.DataFrame, panels: pd.DataFrame, colors: dict[str, str]) -> Figure:
    """`loss_data` as one curve per configuration, a panel per row of `panels` (title, warm-up steps shaded).
    `colors`: label -> colour (see `draw_style.label_colors`)."""
    fig = Figure(figsize=(8, 4.0 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)
    for panel in panels.itertuples():
        ax = axes[panel.panel][0]
        curves = data[data["panel"] == panel.panel].groupby("label", sort=False)
        for i, (label, curve) in enumerate(curves):
            ax.plot(
                curve["step"].to_numpy(),
                curve["loss"].to_numpy(),
                label=label,
                color=colors[label],
                linestyle=LINESTYLES[i % len(LINESTYLES)],
                marker=MARKERS[i % len(MARKERS)],
                markersize=3,
                alpha=0.85,
            )
        if panel.warmup_steps:
            ax.axvspan(-0.5, panel.warmup_steps - 0.5, color="0.9", label="warm-up (not timed)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at step 2.5
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over ranks)")
        ax.set_title(f"{panel.title} — loss per step (mean over repeats)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Loss curves (same model and global batch: the curves of all strategies should coincide)")
    return fig


def draw_sequence(data: pd.DataFrame, summary: pd.DataFrame) -> Figure:
    """`sequence_data`: tokens/s per device and peak memory per rank against the sequence length, a line per
    series (colour by strategy, marker and line style by cp)."""
    fig = Figure(figsize=(12.8, 4.4), layout="constrained")
    rate, memory = fig.subplots(1, 2)
    colors = strategy_colors(summary)
    for i, (series, points) in enumerate(data.groupby("series", sort=False)):
        style = {"color": colors[points["strategy"].iloc[0]], "marker": MARKERS[i % len(MARKERS)],
                 "linestyle": LINESTYLES[i % len(LINESTYLES)], "label": series}
        rate.plot(points["seq_len"], points["tokens_per_s_per_device"], **style)
        memory.plot(points["seq_len"], points["peak_mem_mb"], **style)
    for ax, label in ((rate, "tokens/s per device"), (memory, "peak memory per rank (MB)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(data["seq_len"].unique())))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{n:,}" for n in sorted(data["seq_len"].unique())])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Sequence length: throughput and memory per rank by context-parallel degree (median over repeats)")
    return fig


def _axes_with_data(data: pd.DataFrame, summary: pd.DataFrame, height: float):
    """A figure with a row of axes per panel and a column per kind of scaling that `data` has points for, and
    (axes, panel row, kind, its series, its points) for each axes with points. An axes without (a panel with no weak
    series beside one with) is removed rather than drawn empty."""
    panels = [row for row in range(len(scaling_panels(summary))) if (data["panel"] == row).any()]
    kinds = [kind for kind in scaling_kinds(summary) if (data["kind"] == kind).any()]
    fig = Figure(figsize=(6.4 * len(kinds), height * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), len(kinds), squeeze=False)
    drawn = []
    for row, _, kind, found in scaling_axes(summary):
        if row not in panels or kind not in kinds:
            continue
        ax = axes[panels.index(row)][kinds.index(kind)]
        points = data[(data["panel"] == row) & (data["kind"] == kind)]
        if points.empty:
            ax.remove()
        else:
            drawn.append((ax, row, kind, found, points))
    return fig, drawn


def _style(series: ScalingSeries, summary: pd.DataFrame) -> dict:
    """Colour by strategy; marker and line style by batch (no line through a single point)."""
    b = series.batch_rank
    return {
        "color": strategy_colors(summary)[series.strategy],
        "marker": MARKERS[b % len(MARKERS)],
        "linestyle": LINESTYLES[b % len(LINESTYLES)] if len(series.lines) > 1 else "none",
    }


def _axes_title(summary: pd.DataFrame, series: list[ScalingSeries], kind: str) -> str:
    if not series:
        return KIND_TITLE[kind]
    return f"{panel_title(series[0].lines.iloc[0], summary)} — {KIND_TITLE[kind]}"


def _devices_axis(ax, devices: pd.Series, summary: pd.DataFrame) -> None:
    """Log2 x axis with a tick at each device count drawn (and at 1)."""
    sizes = sorted({1, *(int(n) for n in devices)})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(s) for s in sizes])
    if len(sizes) == 1:
        ax.set_xlim(sizes[0] / 1.5, sizes[0] * 1.5)
    ok = ok_lines(summary)
    one_per_rank = (ok["devices"] == ok["world_size"]).all()
    ax.set_xlabel("devices N (one per rank)" if one_per_rank else "devices N")
    ax.grid(True, alpha=0.3)
