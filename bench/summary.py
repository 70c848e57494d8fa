"""The table printed when a run ends."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

FIELDS = [
    ("status", "status", "{}"),
    ("strategy", "strategy", "{}"),
    ("model", "model", "{}"),
    ("world_size", "ranks", "{}"),
    ("device_name", "device", "{}"),
    ("backend", "backend", "{}"),
    ("params", "params", "{:,}"),
    ("global_batch", "global batch", "{}"),
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
    ("profile_data_wait_pct", "  data wait %", "{:.1f}"),
    ("idle_pct", "  idle %", "{:.1f}"),
]
DOMINANT_STRAGGLER_PCT = 75.0  # a rank last into the collectives in this share of the steps is named


def print_summary(row: dict, results_file: str, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"bench run {row['run_id']}", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    profiled = row.get("profile_steps") is not None
    for key, label, fmt in FIELDS + (PROFILE_FIELDS if profiled else []):
        value = row.get(key)
        table.add_row(label, "-" if value is None else fmt.format(value))
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
    console.print(f"run folder: {row['run_dir']}\nrow appended to: {results_file}", soft_wrap=True, markup=False)


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
