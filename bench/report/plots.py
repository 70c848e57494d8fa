"""The report's figures. Each `*_figure` function builds its data (`figure_data`), draws it (`draw_panels`,
`draw_bars`) and returns a `Plot`: the matplotlib Figure and the data drawn in it, saved beside the images
as `<name>.csv` so a plot can be checked or redrawn. None when there is nothing to draw: an empty figure is
neither written nor listed, and an axes with nothing to draw is left out of its figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from bench.report import figure_data
from bench.report.draw_bars import (
    draw_breakdown,
    draw_comparison,
    draw_memory,
    draw_step_time,
    draw_time_breakdown,
    memory_measure,
)
from bench.report.draw_panels import draw_efficiency, draw_loss, draw_sequence, draw_throughput
from bench.report.draw_style import label_colors
from bench.report.load import steps_by_configuration


@dataclass
class Plot:
    name: str
    figure: Figure
    data: pd.DataFrame


def throughput_figure(summary: pd.DataFrame) -> Plot | None:
    data = figure_data.throughput_data(summary)
    return None if data.empty else Plot("throughput", draw_throughput(data, summary), data)


def efficiency_figure(summary: pd.DataFrame) -> Plot | None:
    """None without a 1-device baseline: there is no efficiency to draw."""
    data = figure_data.efficiency_data(summary)
    return None if data.empty else Plot("scaling_efficiency", draw_efficiency(data, summary), data)


def memory_figure(summary: pd.DataFrame, runs: pd.DataFrame) -> Plot | None:
    data = figure_data.memory_data(summary)
    if data.empty:
        return None
    ok = runs[runs["status"] == "ok"]
    measure = memory_measure(set(ok["device"]), tracked="mem_temp_mb" in ok and ok["mem_temp_mb"].notna().any())
    return Plot("peak_memory", draw_memory(data, label_colors(summary), measure), data)


def sequence_figure(summary: pd.DataFrame) -> Plot | None:
    data = figure_data.sequence_data(summary)
    return None if data.empty else Plot("sequence", draw_sequence(data, summary), data)


def step_time_figure(summary: pd.DataFrame, steps: dict) -> Plot | None:
    """`steps`: see `load.steps_by_configuration`."""
    times = figure_data.step_times(summary, steps)
    if times.empty:
        return None
    return Plot("step_time", draw_step_time(times, label_colors(summary)), figure_data.step_time_data(times))


def loss_figure(summary: pd.DataFrame, steps: dict) -> Plot | None:
    data = figure_data.loss_data(summary, steps)
    if data.empty:
        return None
    panels = figure_data.loss_panels(summary, steps)
    return Plot("loss", draw_loss(data, panels, label_colors(summary)), data)


def breakdown_figure(summary: pd.DataFrame, steps: dict) -> Plot | None:
    data = figure_data.breakdown_data(summary, steps)
    return None if data.empty else Plot("breakdown", draw_breakdown(data), data)


def time_breakdown_figure(summary: pd.DataFrame) -> Plot | None:
    data = figure_data.time_breakdown_data(summary)
    return None if data.empty else Plot("time_breakdown", draw_time_breakdown(data), data)


def comparison_figure(verdicts: pd.DataFrame) -> Plot | None:
    data = figure_data.comparison_data(verdicts)
    return None if data.empty else Plot("comparison", draw_comparison(data), data)


def report_figures(summary: pd.DataFrame, runs: pd.DataFrame) -> list[Plot]:
    """Every figure of a report (the comparison aside), in the report's order."""
    steps = steps_by_configuration(runs)
    made = [
        throughput_figure(summary),
        efficiency_figure(summary),
        memory_figure(summary, runs),
        sequence_figure(summary),
        step_time_figure(summary, steps),
        loss_figure(summary, steps),
        breakdown_figure(summary, steps),
        time_breakdown_figure(summary),
    ]
    return [p for p in made if p is not None]


FIGURE_NAMES = ("throughput", "scaling_efficiency", "peak_memory", "sequence", "step_time", "loss", "breakdown",
                "time_breakdown", "comparison")
FIGURE_SUFFIXES = (".png", ".svg", ".csv")


def remove_stale(out: Path, drawn: list[Plot]) -> None:
    """Delete the files of figures an earlier report drew into `out` and this one does not (no data for them
    now), so that the folder shows only what this report's data supports."""
    for name in set(FIGURE_NAMES) - {plot.name for plot in drawn}:
        for suffix in FIGURE_SUFFIXES:
            (out / f"{name}{suffix}").unlink(missing_ok=True)


def save(plot: Plot, out: Path) -> list[Path]:
    """<name>.png, <name>.svg and <name>.csv (the data drawn) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{plot.name}.png", out / f"{plot.name}.svg", out / f"{plot.name}.csv"]
    plot.figure.savefig(paths[0], dpi=120)
    plot.figure.set_layout_engine("none")  # keep the layout just computed: the SVG needs no second pass
    plot.figure.savefig(paths[1])
    plot.data.to_csv(paths[2], index=False)
    return paths
