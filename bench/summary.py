"""The table printed when a run ends."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.measure.stats import confidence_interval_95

FIELDS = [
    ("status", "status", "{}"),
    ("strategy", "strategy", "{}"),
    ("model", "model", "{}"),
    ("world_size", "ranks", "{}"),
    ("device_name", "device", "{}"),
    ("backend", "backend", "{}"),
    ("params", "params", "{:,}"),
    ("global_batch", "global batch", "{}"),
    ("seq_len", "sequence length (tokens)", "{:,}"),
    ("cp", "context-parallel ranks (cp)", "{}"),
    ("ep", "expert-parallel ranks (ep)", "{}"),
    ("samples_per_s", "samples/s", "{:,.1f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("step_time_ms_mean", "step ms mean", "{:.2f}"),
    ("step_time_ms_p50", "step ms p50", "{:.2f}"),
    ("predicted_step_time_ms", "  predicted (bench.plan)", "{:.2f}"),
    ("step_time_ms_p90", "step ms p90", "{:.2f}"),
    ("step_time_ms_p99", "step ms p99", "{:.2f}"),
    ("step_time_ms_std", "step ms std", "{:.2f}"),
    ("first_step_ms", "first step ms", "{:.1f}"),
    ("data_wait_pct", "data wait %", "{:.2f}"),
    ("peak_mem_mb", "peak tensors MB (rank holding most)", "{:,.1f}"),
    ("predicted_peak_mem_mb", "  predicted before the run (rank 0)", "{:,.1f}"),
    ("mem_params_mb", "  parameters MB", "{:,.1f}"),
    ("mem_grads_mb", "  gradients MB", "{:,.1f}"),
    ("mem_optim_mb", "  optimizer state MB", "{:,.1f}"),
    ("mem_activations_mb", "  activations MB", "{:,.1f}"),
    ("mem_temp_mb", "  temporaries MB", "{:,.1f}"),
    ("cuda_peak_allocated_mb", "CUDA peak allocated MB", "{:,.0f}"),
    ("peak_rss_mb", "process RSS peak MB", "{:,.0f}"),
    ("tflops_per_device", "model TFLOP/s per device", "{:.3f}"),
    ("mfu_pct", "MFU %", "{:.1f}"),
    ("hfu_pct", "HFU %", "{:.1f}"),
    ("peak_tflops", "peak TFLOP/s", "{:,.1f}"),
    ("peak_source", "peak from", "{}"),
    ("loss_first", "loss first", "{:.4f}"),
    ("loss_last", "loss last", "{:.4f}"),
    ("parity_max_rel_diff", "parity vs single", "{:.2e}"),
    ("duration_s", "wall s", "{:.1f}"),
    ("slurm_job_id", "SLURM job", "{}"),
]


# profile=true: where the profiled steps' time went (bench.measure.breakdown), shown for profiled runs only
PROFILE_FIELDS = [
    ("profile_step_time_ms", "profiled step ms (profiler on)", "{:.2f}"),
    ("compute_pct", "  compute %", "{:.1f}"),
    ("comm_pct", "  communication %", "{:.1f}"),
    ("comm_exposed_pct", "  communication exposed %", "{:.1f}"),
    ("overlap_pct", "  communication hidden by compute %", "{:.1f}"),
    ("comm_by_collective_ms", "  by collective, ms a step", "{:.1f}"),
    ("profile_data_wait_pct", "  data wait %", "{:.1f}"),
    ("idle_pct", "  idle %", "{:.1f}"),
]
DOMINANT_STRAGGLER_PCT = 75.0  # a rank last into the collectives in this share of the steps is named


# Set by the controller on a row in memory once it could not be appended (never written: it is not a field): the
# run folder's copy of the row, or None where that could not be written either
NOT_APPENDED = "_not_appended"


def print_rows(rows: list[dict], results_file: Path) -> None:
    """The summary of the run (of the repeat with the median throughput), then, with repeats, their spread. The
    rows are written already: a summary that cannot be printed is one line, not a traceback."""
    try:
        measured = sorted((r for r in rows if r["samples_per_s"] is not None), key=lambda r: r["samples_per_s"])
        shown = measured[(len(measured) - 1) // 2] if measured else rows[-1]
        print_summary(shown, str(results_file), appended=NOT_APPENDED not in shown, copy=shown.get(NOT_APPENDED))
        if len(rows) > 1:
            print(repeats_line(rows))
    except Exception as exc:
        print(f"bench: warning: the summary could not be printed: {type(exc).__name__}: {exc}", file=sys.stderr)


def repeats_line(rows: list[dict]) -> str:
    rates = [r["samples_per_s"] for r in rows if r["samples_per_s"] is not None]
    failed = len(rows) - len(rates)
    text = f"samples/s over {len(rows)} repeats"
    if rates:
        text += f": median {statistics.median(rates):,.1f}, mean {statistics.fmean(rates):,.1f}"
    interval = confidence_interval_95(rates)
    if interval:
        text += f", 95% CI [{interval[0]:,.1f}, {interval[1]:,.1f}] (Student t, n={len(rates)})"
    text += f"; each: {', '.join(f'{r:,.1f}' for r in rates)}"
    return text + (f"; {failed} without a measurement" if failed else "")


def formatted(value, fmt: str) -> str:
    """`value` as its line shows it; a value of another type than the line expects, as it is."""
    if value is None:
        return "-"
    if isinstance(value, dict):  # {name: number}, as `name 1.2, other 3.4`
        return ", ".join(f"{k} {formatted(v, fmt)}" for k, v in value.items()) or "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def print_summary(row: dict, results_file: str, console: Console | None = None, appended: bool = True,
                  copy: str | None = None) -> None:
    """The row's table, its error and warnings, and where the row is: in `results_file`, or, where it could not
    be appended (`appended` False: the controller said why), only in `copy` (the run folder's) if anywhere."""
    console = console or Console()
    table = Table(title=f"bench run {row['run_id']}", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    profiled = row.get("profile_steps") is not None
    for key, label, fmt in FIELDS + (PROFILE_FIELDS if profiled else []):
        table.add_row(label, formatted(row.get(key), fmt))
    console.print(table)
    if profiled:
        console.print(profile_lines(row), markup=False)
    if row.get("error"):
        console.print("[red]error:[/red] ", end="")
        console.print(row["error"], markup=False)
    for warning in row.get("warnings", []):
        console.print("[yellow]warning:[/yellow] ", end="")
        console.print(warning, markup=False)
    # paths whole, however narrow the terminal: they are copied into the next command
    if appended:
        where = f"row appended to: {results_file}"
    else:
        kept = f"its only copy: {copy}" if copy else "nor written anywhere else: it is in this summary only"
        where = f"row NOT appended to: {results_file} (why is said above); {kept}"
    console.print(f"run folder: {row['run_dir']}\n{where}", soft_wrap=True, markup=False)


def profile_lines(row: dict) -> str:
    """Where the traces are and how to open them; the straggler, when one rank dominates."""
    lines = [f"traces: {row['run_dir']}/traces/rank<N>.json.gz (open in https://ui.perfetto.dev or "
             "chrome://tracing); per rank and step: breakdown.csv"]
    share = row.get("straggler_share_pct")
    if share is not None and share >= DOMINANT_STRAGGLER_PCT:
        steps = row["profile_steps"]
        lines.append(f"straggler: rank {row['straggler_rank']} entered the collectives last in "
                     f"{round(share * steps / 100)} of {steps} profiled steps, {row['straggler_late_ms']:.2f} ms "
                     "after the other ranks on average")
    return "\n".join(lines)
