"""What `python -m bench.search` leaves: `search.csv` (each run, predicted against measured), `frontier.csv`,
`prediction_error.png`, and the table and best configuration it prints."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table


def measured_line(row: dict | None, predicted: dict, kind: str) -> dict:
    """One run of the search: what was predicted of it beside what it measured."""
    row = row or {}
    line = {"kind": kind, **predicted, "status": row.get("status", "not run"), "run_dir": row.get("run_dir"),
            "measured_step_ms": row.get("step_time_ms_p50"), "measured_peak_mb": row.get("peak_mem_mb"),
            "measured_per_device": row.get("tokens_per_s_per_device") or row.get("samples_per_s_per_device")}
    for what in ("step_ms", "peak_mb"):
        p, m = line.get(f"predicted_{what}"), line[f"measured_{what}"]
        line[f"{what}_error_pct"] = 100 * (p - m) / m if p and m and not pd.isna(p) else None
    return line


def report(lines: list[dict], frontiers: list[dict], folder: Path, console: Console, launched: int) -> int:
    runs = pd.DataFrame(lines)
    runs.to_csv(folder / "search.csv", index=False)
    pd.DataFrame(frontiers).to_csv(folder / "frontier.csv", index=False)

    def number(value, spec: str) -> str:
        return "-" if value is None or pd.isna(value) else format(value, spec)

    view = Table(title="bench.search: predicted against measured", title_justify="left")
    for column in ("run", "strategy", "ranks", "dp×tp×pp", "ckpt", "batch", "step ms pred", "step ms meas", "err %",
                   "MB pred", "MB meas", "err %", "status"):
        view.add_column(column, justify="left" if column in ("run", "strategy", "status") else "right")
    for r in lines:
        view.add_row(r["kind"], r["strategy"], str(r["world_size"]), r["layout"],
                     "on" if r["activation_checkpointing"] else "off", str(r["global_batch"]),
                     number(r["predicted_step_ms"], ",.1f"), number(r["measured_step_ms"], ",.1f"),
                     number(r["step_ms_error_pct"], "+.0f"), number(r["predicted_peak_mb"], ",.1f"),
                     number(r["measured_peak_mb"], ",.1f"), number(r["peak_mb_error_pct"], "+.0f"), r["status"])
    console.print(view)
    for f in frontiers:
        console.print(f"frontier of {f['strategy']} {f['layout']} on {f['world_size']} rank(s) in "
                      f"{f['memory_limit_mb']:,.0f} MB: predicted {f['predicted_max_batch_per_replica']} per replica, "
                      f"measured {f['measured_max_batch_per_replica']} fits, {f['first_oom_batch_per_replica']} "
                      f"runs out ({f['probes']} runs)")
    ok = [r for r in lines if r["kind"] == "top" and r["status"] == "ok" and r["measured_per_device"]]
    if ok:
        best = max(ok, key=lambda r: r["measured_per_device"])
        console.print(f"best measured: strategy={best['strategy']} on {best['world_size']} rank(s), layout "
                      f"{best['layout']}, activation_checkpointing={best['activation_checkpointing']}: "
                      f"{best['measured_per_device']:,.0f} per second per device ({best['run_dir']})")
    figure = draw_errors(runs, folder / "prediction_error.png")
    console.print(f"{launched} run(s) launched, the rest reused; search.csv, frontier.csv"
                  f"{' and ' + figure.name if figure else ''} in {folder}")
    return 0 if ok else 1


def draw_errors(runs: pd.DataFrame, path: Path) -> Path | None:
    """Predicted against measured step time and memory, one point per run, with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("step_ms", "step time (ms)"), ("peak_mb", "peak memory per rank (MB)")]
    if runs.empty or all(runs[[f"predicted_{k}", f"measured_{k}"]].dropna().empty for k, _ in panels):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (key, label) in zip(axes, panels, strict=True):
        both = runs[[f"predicted_{key}", f"measured_{key}", "strategy"]].dropna()
        for strategy, group in both.groupby("strategy"):
            ax.scatter(group[f"measured_{key}"], group[f"predicted_{key}"], label=strategy)
        if not both.empty:
            low, high = both[[f"predicted_{key}", f"measured_{key}"]].min().min(), \
                both[[f"predicted_{key}", f"measured_{key}"]].max().max()
            ax.plot([low, high], [low, high], "k--", linewidth=1, label="predicted = measured")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("bench.search: prediction against measurement", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
