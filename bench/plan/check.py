"""`python -m bench.plan.check [overrides]`: the plan's predictions against the runs measured under
`results_dir` (its runs.jsonl and its sweeps', `bench.plan.throughput.results_files`), so that a user sees how far
to trust a plan on their own machines before using it.

Takes `bench.plan`'s keys. For every layout of the plan that was run (the same configuration, `bench.configs`,
however long it ran, on this device), it prints the measured step time and peak
per rank (the median over the matching runs) beside the plan's predictions: a priori (`plan.calibrate=false`)
and calibrated by the strategy's other runs (a layout's own runs never calibrate it), with their errors, and
writes them to `<results_dir>/plans/<time>_check/check.csv` and `check.md`. The error table in
docs/plan-and-search.md is its output.
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
from pathlib import Path

import pandas as pd

from bench.configs import LENGTH_KEYS
from bench.plan.setup import prepare_plan
from bench.plan.table import Planned, make_plan
from bench.plan.throughput import measured_runs

LAYOUT_COLUMNS = ("world_size", "strategy", "layout", "activation_checkpointing", "grad_accum")
USAGE = """usage: python -m bench.plan.check [KEY=VALUE ...]

The plan's predictions (the keys of `python -m bench.plan`) beside the runs measured under results_dir (its
runs.jsonl and each sweep's, sweeps/*/runs.jsonl) of the same layouts: step time a priori and calibrated, and
memory, with their errors. Writes <results_dir>/plans/<time>_check/check.csv and check.md."""


def measured(line: Planned, device_name: str) -> dict | None:
    """The median step time and peak per rank of the runs of this layout's configuration (its length aside)."""
    rows = [row for row in measured_runs(line.run.config["results_dir"], line.run.config, device_name, LENGTH_KEYS)
            if row.get("step_time_ms_p50")]
    if not rows:
        return None
    peaks = [r["peak_mem_mb"] for r in rows if r.get("peak_mem_mb") is not None]  # null: a peak not measured
    return {"runs": len(rows), "measured_step_ms": statistics.median(r["step_time_ms_p50"] for r in rows),
            "measured_peak_mb": statistics.median(peaks) if peaks else None}


def check_table(overrides: list[str]) -> tuple[dict, pd.DataFrame]:
    """(the composed config, one line per layout both planned and measured: measured, predicted a priori and
    calibrated, and their errors in %)."""
    planning = prepare_plan(overrides)
    a_priori = [line for line in make_plan(planning, calibrate=False, prune=False) if line.run is not None]
    calibrated = {line.layout: line for line in make_plan(planning, calibrate=True, prune=False)}
    lines = []
    for prior in a_priori:
        got = measured(prior, planning.device_name)
        if got is None:
            continue
        cal, layout = calibrated[prior.layout], prior.line()
        lines.append({
            "model": planning.base["model"]["name"], **{k: layout[k] for k in LAYOUT_COLUMNS}, **got,
            "predicted_step_ms": prior.predicted_step_ms, "calibrated_step_ms": cal.predicted_step_ms,
            "calibrated_by": cal.calibration.get("source") or "nothing measured to calibrate by",
            "predicted_peak_mb": prior.memory["total"] if prior.memory else None,
        })
    table = pd.DataFrame.from_records(lines, columns=[
        "model", *LAYOUT_COLUMNS, "runs", "measured_step_ms", "predicted_step_ms", "calibrated_step_ms",
        "calibrated_by", "measured_peak_mb", "predicted_peak_mb"])
    for predicted, measured_column, error in (("predicted_step_ms", "measured_step_ms", "step_error_pct"),
                                              ("calibrated_step_ms", "measured_step_ms", "calibrated_error_pct"),
                                              ("predicted_peak_mb", "measured_peak_mb", "memory_error_pct")):
        table[error] = 100 * (table[predicted].astype(float) / table[measured_column].astype(float) - 1)
    return planning.base, table


def markdown(table: pd.DataFrame) -> str:
    """The table as docs/plan-and-search.md shows it, and the mean and largest absolute errors (of the layouts
    predicted: a column with no prediction says so, never nan)."""
    def cell(value, spec: str, unit: str = "") -> str:
        return "–" if value is None or pd.isna(value) else format(value, spec) + unit

    out = ["| model | strategy | ranks | dp×tp×pp | measured step ms | predicted (a priori) | error | "
           "predicted (calibrated) | error | calibrated by | measured MB | predicted MB | error |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in table.to_dict("records"):
        out.append(f"| {r['model']} | {r['strategy']} | {r['world_size']} | {r['layout']} | "
                   f"{r['measured_step_ms']:.1f} | {cell(r['predicted_step_ms'], '.1f')} | "
                   f"{cell(r['step_error_pct'], '+.0f', '%')} | {cell(r['calibrated_step_ms'], '.1f')} | "
                   f"{cell(r['calibrated_error_pct'], '+.0f', '%')} | {r['calibrated_by']} | "
                   f"{cell(r['measured_peak_mb'], '.1f')} | {cell(r['predicted_peak_mb'], '.1f')} | "
                   f"{cell(r['memory_error_pct'], '+.1f', '%')} |")
    summary = ", ".join(f"{label} {error_summary(table[column])}"
                        for label, column in (("step time a priori", "step_error_pct"),
                                              ("calibrated", "calibrated_error_pct"),
                                              ("memory", "memory_error_pct")))
    return "\n".join(out) + f"\n\n{len(table)} layouts: {summary}\n"


def error_summary(errors: pd.Series) -> str:
    """The mean and largest absolute error of the layouts predicted; how many were not."""
    predicted = errors.dropna().abs()
    if predicted.empty:
        return "– (no predictions to compare)"
    missing = len(errors) - len(predicted)
    return (f"|error| mean {predicted.mean():.1f}%, max {predicted.max():.1f}%"
            + (f" ({missing} not predicted)" if missing else ""))


def main(argv: list[str] | None = None) -> int:
    from bench.plan.__main__ import wants_help

    overrides = sys.argv[1:] if argv is None else argv
    if wants_help(overrides, USAGE):
        return 0
    try:
        base, table = check_table(overrides)
    except Exception as exc:  # PlanError, or a key or value Hydra cannot compose: one line
        print(f"bench.plan.check: invalid config: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    if table.empty:
        print("bench.plan.check: no measured run matches a planned layout: run them first (python -m bench -m "
              "strategy=ddp,fsdp launch.nproc=2,4 ...), with the same model, global_batch and results_dir",
              file=sys.stderr)
        return 1
    text = markdown(table)
    print(text, end="")
    out = Path(base["results_dir"]) / "plans" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_check")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "check.csv", index=False)
    (out / "check.md").write_text(text)
    print(f"written to {out}/check.csv and check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
