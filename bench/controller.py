"""The training benchmark's controller: check and pin the config once, launch the ranks, record one row.

Runs inside the Hydra app (`python -m bench`, see `bench.app`); the ranks it starts (`bench.rank.worker`)
never import Hydra.
"""

from __future__ import annotations

import csv
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.app import JobResult, now
from bench.checks import config_warnings
from bench.data import prepare_data
from bench.errors import ConfigError
from bench.launch import Worker, failure_status, launch
from bench.measure.breakdown import PARTS_MS, stragglers
from bench.measure.flops import step_flops
from bench.measure.rows import global_losses, measured_fields, no_measurements
from bench.measure.stats import confidence_interval_95, max_over_ranks
from bench.models import model_label
from bench.results import append_row, run_fields, write_json_atomic
from bench.run import Run
from bench.run import prepare as resolve
from bench.runfolder import BREAKDOWN, ROW, STEPS, read_rank_results
from bench.summary import print_summary
from bench.verify import verify_parity

log = logging.getLogger("bench")

WORKER = Worker("bench.rank.worker", "train_rank")


@dataclass(frozen=True)
class Prepared:
    """A run resolved and checked before anything starts: the run, what its rank 0 is predicted to hold (MB by
    kind, `bench.plan.memory`; None where it was not predicted) and what the row should say about that."""

    run: Run
    predicted_memory_mb: dict | None = None
    warnings: tuple[str, ...] = ()


def prepare(cfg: dict) -> Prepared:
    """Resolve the config into a run (`bench.run.prepare`: checked, pinned, frozen), write its dataset once,
    then refuse it if its ranks are predicted not to fit here (unless `force=true`)."""
    run = resolve(cfg)
    prepare_data(run)  # once, here, before any rank reads it
    return Prepared(run) if run.config["force"] else check_memory(run)


def check_memory(run: Run) -> Prepared:
    """Refuse a run whose rank 0 is predicted (`bench.plan.memory`) to need more than a rank may hold on this
    machine; the prediction goes into the row beside what the run measured. Where there is no prediction to
    check, the row says why."""
    from bench.plan.memory import available_memory_mb, memory_refusal, predicted_memory_mb

    if not run.launcher.runs_here:
        return Prepared(run, warnings=(f"memory: not checked before the run: launch={run.launcher.name} does not "
                                       "start every rank on this machine",))
    predicted, why = predicted_memory_mb(run)  # why not: the strategy's reason, or what fake tensors could not run
    if predicted is None:
        return Prepared(run, warnings=(f"memory: not checked before the run: {why}",))
    refusal = memory_refusal(predicted, *available_memory_mb(run))
    if refusal:
        raise ConfigError(refusal)
    return Prepared(run, predicted)


def empty_row(cfg, run_dir: Path, started_at: str, overrides: list[str], repeat: int = 0) -> dict:
    """A training run's row with nothing measured: its identity and config, the measured fields null."""
    row = run_fields(cfg, run_dir, started_at, overrides)
    row.update(
        strategy=cfg["strategy"]["name"],
        model=model_label(cfg["model"]),
        data=cfg["data"]["name"],
        global_batch=cfg["global_batch"],
        steps=cfg["steps"],
        warmup=cfg["warmup"],
        repeat=repeat,
        repeats=cfg["repeats"],
        predicted_peak_mem_mb=None,
        predicted_step_time_ms=None,
    )
    return {**row, **no_measurements()}


def run_benchmark(prepared: Prepared, run_dir: Path, results_file: Path, overrides: list[str]) -> JobResult:
    """Run one configuration `repeats` times, each in fresh processes (`<run_dir>/repeat<i>/` when more than
    once), one row each, and say how it went. Stops at an interruption. No rows where another controller
    records them (the nodes of a multi-node run that do not hold global rank 0, inline ranks but 0)."""
    run, predicted = prepared.run, prepared.predicted_memory_mb
    rows, outcome, ok = [], None, True
    for repeat in range(run.config["repeats"]):
        folder = run_dir if run.config["repeats"] == 1 else run_dir / f"repeat{repeat}"
        row, outcome = run_once(run, folder, overrides, repeat)
        if row is None:
            return JobResult(None, outcome, ok=outcome.status == "ok")
        row["predicted_peak_mem_mb"] = predicted["total"] if predicted else None
        row["predicted_step_time_ms"] = run.config["predicted_step_time_ms"]
        row["warnings"] += list(prepared.warnings)
        ok &= record_row(row, folder, results_file) and row_ok(row, run.config)
        rows.append(row)
        if outcome.status == "interrupted":
            break
    return JobResult(rows, outcome, ok=ok)


def row_ok(row: dict, cfg) -> bool:
    """The run measured, and where it was to be checked against one device, it was, and it matched."""
    return row["status"] == "ok" and (not cfg["verify"] or row["parity_ok"] is True)


def record_row(row: dict, run_dir: Path, results_file: Path) -> bool:
    """The row into `<run_dir>/row.json` (the run's own copy, for `bench.report --from-run-folders` where a
    shared results file cannot be trusted, e.g. flock across NFS clients), then appended to the results file.
    False, and the user told, when the row could not be appended whole."""
    try:
        write_json_atomic(run_dir / ROW, row)
    except OSError as exc:
        print(f"bench: warning: could not write {run_dir / ROW}: {exc}", file=sys.stderr)
    try:
        append_row(results_file, row)
    except OSError as exc:
        print(f"bench: the row of {row['run_id']} could NOT be appended to {results_file}: {exc}", file=sys.stderr)
        return False
    return True


def run_once(run: Run, run_dir: Path, overrides: list[str], repeat: int):
    """Launch the ranks once and build the row: (row, how the launch ended); no row where another controller
    records it. Only result files stamped with this launch's id are read."""
    cfg = run.config
    started_at = now()
    start = time.perf_counter()
    run.save(run_dir)
    outcome = launch(cfg, run_dir, WORKER)
    if not outcome.records_row:
        return None, outcome

    row = empty_row(cfg, run_dir, started_at, overrides, repeat)
    if cfg["repeats"] > 1:
        row["run_id"] = f"{run_dir.parent.name}/{run_dir.name}"
    row["slurm_job_id"] = outcome.slurm_job_id or os.environ.get("SLURM_JOB_ID")
    row["warnings"] += config_warnings(cfg)
    world = run.world_size
    ranks = read_rank_results(run_dir, world, outcome.launch_id)
    if len(ranks) == world:
        ordered = [ranks[r] for r in range(world)]
        tokens = run.model.tokens_per_sample(cfg["model"])
        measured = measured_fields(cfg, ordered, step_flops(run), tokens)
        row.update(measured, warnings=row["warnings"] + measured.pop("warnings", []))
        write_steps_csv(run_dir / STEPS, cfg["warmup"], ordered)
        if all(r.get("profile") for r in ordered):
            write_breakdown_csv(run_dir / BREAKDOWN, ordered)
        if cfg["verify"]:
            row.update(verify_parity(run, run_dir, ordered, row["warnings"], WORKER))
        if outcome.status != "ok":
            # Every rank handed in its results before something went wrong in teardown: the numbers stand.
            row["warnings"].append(f"{outcome.status} after every rank had written its results: {outcome.error}")
    else:
        missing = sorted(set(range(world)) - set(ranks))
        row["status"] = failure_status(outcome)
        row["failed_rank"] = outcome.first_failed_rank
        row["error"] = outcome.error or f"ranks {missing} exited without writing results"
    row.update(outcome.extra_fields)
    row["duration_s"] = time.perf_counter() - start
    return row, outcome


def write_steps_csv(path: Path, warmup: int, ranks: list[dict]) -> None:
    """Per-step record: the step's time (max over ranks), its loss, data wait and every rank's time."""
    step_s = max_over_ranks([r["step_time_s"] for r in ranks])
    losses = global_losses(ranks)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            ["step", "measured", "step_time_ms", "loss", "data_wait_ms_max"]
            + [f"step_time_ms_rank{r['rank']}" for r in ranks]
        )
        for i, t in enumerate(step_s):
            out.writerow(
                [
                    i,
                    int(i >= warmup),
                    f"{t * 1e3:.4f}",
                    f"{losses[i]:.6f}" if losses else "",
                    f"{max(r['data_wait_s'][i] for r in ranks) * 1e3:.4f}",
                ]
                + [f"{r['step_time_s'][i] * 1e3:.4f}" for r in ranks]
            )


def write_breakdown_csv(path: Path, ranks: list[dict]) -> None:
    """Per rank and profiled step: the step's time by part (ms, summing to step_ms) and how many of its
    collectives the rank entered last (`bench.measure.breakdown`)."""
    last_in = stragglers([r["profile"]["collectives"] for r in ranks])["last_in"]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["rank", "step", "step_ms", *PARTS_MS, "collectives", "last_in"])
        for i, r in enumerate(ranks):
            for step, (parts, entered) in enumerate(zip(r["profile"]["steps"], r["profile"]["collectives"],
                                                        strict=True)):
                last = last_in[i][step] if last_in and step < len(last_in[i]) else ""
                out.writerow([r["rank"], step, f"{parts['step_ms']:.4f}", *(f"{parts[k]:.4f}" for k in PARTS_MS),
                              len(entered), last])


def print_rows(rows: list[dict], results_file: Path) -> None:
    """The summary of the run (of the repeat with the median throughput), then, with repeats, their spread."""
    measured = sorted((r for r in rows if r["samples_per_s"] is not None), key=lambda r: r["samples_per_s"])
    print_summary(measured[(len(measured) - 1) // 2] if measured else rows[-1], str(results_file))
    if len(rows) > 1:
        print(repeats_line(rows))


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
