"""The plan's throughput per device against world size: projected lines (dashed) with the runs of the same
model, global batch and device measured here (solid points) on the same axes, the model's assumptions in the
figure."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from bench.configs import LENGTH_KEYS
from bench.models import model_label
from bench.plan.setup import Planning
from bench.plan.throughput import measured_runs

# The measured points beside the projection: this model at the plan's global batch, any strategy and world size.
POINTS_VARY = ("launch.", "parallel.", "strategy.", *LENGTH_KEYS)


def measured_points(base: dict, device_name: str) -> pd.DataFrame:
    """Median tokens/s per device (samples where the model has no tokens) of the `ok` runs under `results_dir`
    (`bench.plan.throughput.results_files`) with the plan's model, global batch and device, by strategy and world
    size."""
    points: dict[tuple[str, int], list[float]] = {}
    for row in measured_runs(base["results_dir"], base, device_name, POINTS_VARY):
        rate = row.get("tokens_per_s_per_device") or row.get("samples_per_s_per_device")
        if rate and row.get("world_size"):  # a row may leave it null (`bench.results.run_row_problem`)
            points.setdefault((row["config"]["strategy"]["name"], row["world_size"]), []).append(rate)
    return pd.DataFrame([{"strategy": s, "world_size": w, "measured_per_device": statistics.median(v),
                          "runs": len(v)} for (s, w), v in sorted(points.items())],
                        columns=["strategy", "world_size", "measured_per_device", "runs"])


def draw_projection(table: pd.DataFrame, points: pd.DataFrame, planning: Planning, path: Path) -> Path | None:
    """One line per strategy, its fastest layout that fits at each world size; None when nothing is predicted
    to fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rate = "predicted_tokens_per_s_per_device"
    lines = table[(table["status"] == "fits") & table[rate].notna()]
    if lines.empty:
        return None
    # a strategy's best layout that fits at each world size (its degrees, checkpointing, accumulation)
    lines = lines.sort_values(rate, ascending=False).drop_duplicates(["strategy", "world_size"])
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {}
    for strategy, group in lines.groupby("strategy", sort=False):
        group = group.sort_values("world_size")
        (line,) = ax.plot(group["world_size"], group[rate], linestyle="--", marker="o", fillstyle="none",
                          label=f"{strategy} (projected)")
        colors[strategy] = line.get_color()
    for strategy, group in points.groupby("strategy", sort=False):
        ax.plot(group["world_size"], group["measured_per_device"], linestyle="-", marker="o",
                color=colors.get(strategy, "black"), label=f"{strategy} (measured)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks (devices)")
    base, network = planning.base, planning.network
    ax.set_ylabel("tokens/s per device" if base["model"].get("seq_len") else "samples/s per device")
    model = model_label(base["model"])
    ax.set_title(f"{model}, global batch {base['global_batch']}, {base['precision']}: throughput per device",
                 fontsize=10)
    sources = "; ".join(lines["throughput_from"].dropna().unique())
    assumptions = (f"network: {network.name} ({network.source}); {network.gpus_per_node} ranks per node\n"
                   f"compute: {sources}\n"
                   f"overlap of data-parallel communication: {planning.plan['overlap']:.0%}; tensor-parallel and "
                   "pipeline communication exposed; pipeline bubble (pp-1)/(m+pp-1)")
    fig.text(0.01, 0.01, assumptions, fontsize=7, va="bottom", wrap=True)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
