"""The training benchmark's controller: check and pin the config once, launch the ranks, record one row.

Runs inside the Hydra app (`python -m bench`, see `bench.app`); the ranks it starts (`bench.rank.worker`)
never import Hydra.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

from bench.app import JobResult, now
from bench.checks import ConfigError, config_warnings, parallel_degrees, pin_device, validate
from bench.data import prepare_data
from bench.launch import Worker, failure_status, launch
from bench.measure import parity
from bench.measure.breakdown import PARTS_MS, stragglers
from bench.measure.rows import global_losses, measured_fields, no_measurements
from bench.measure.stats import confidence_interval_95, max_over_ranks
from bench.models import model_label
from bench.results import append_row, cached_json, read_rank_results, run_fields, write_config, write_json_atomic
from bench.strategies import strategy_spec
from bench.summary import print_summary

log = logging.getLogger("bench")

WORKER = Worker("bench.rank.worker", "train_rank")
PREDICTION_KEY = "_predicted_mem_mb"  # from `prepare` to `run_benchmark`, never written into a run's config


def prepare(cfg: dict) -> dict:
    """Validate, then pin everything the ranks must agree on (the degrees, the device) into the config."""
    validate(cfg)
    pin_device(cfg)
    cfg["parallel"] = parallel_degrees(cfg)  # the ranks get the degrees resolved, -1 inferred
    prepare_data(cfg)  # once, here, before any rank reads it
    if not cfg["force"]:
        check_memory(cfg)
    return cfg


def check_memory(cfg: dict) -> None:
    """Refuse a run whose rank 0 is predicted (`bench.plan.memory`) to need more than a rank may hold on this
    machine; the prediction goes into the row beside what the run measured."""
    from bench.plan.memory import available_memory_mb, memory_refusal, predicted_memory_mb

    available = available_memory_mb(cfg)
    if available is None:
        return  # the ranks run elsewhere (SLURM, other nodes, inline): nothing here to check against
    predicted = predicted_memory_mb(cfg)
    if predicted is not None:
        refusal = memory_refusal(predicted, *available)
        if refusal:
            raise ConfigError(refusal)
        cfg[PREDICTION_KEY] = predicted  # taken out again by run_benchmark: the ranks' config never has it


def empty_row(cfg: dict, run_dir: Path, started_at: str, overrides: list[str], repeat: int = 0) -> dict:
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


def run_benchmark(cfg: dict, run_dir: Path, results_file: Path, overrides: list[str]) -> JobResult:
    """Run one configuration `repeats` times, each in fresh processes (`<run_dir>/repeat<i>/` when more than
    once), one row each, and say how it went. Stops at an interruption. No rows where another controller
    records them (the nodes of a multi-node run that do not hold global rank 0, inline ranks but 0)."""
    predicted = cfg.pop(PREDICTION_KEY, None)
    rows, outcome, ok = [], None, True
    for repeat in range(cfg["repeats"]):
        folder = run_dir if cfg["repeats"] == 1 else run_dir / f"repeat{repeat}"
        row, outcome = run_once(cfg, folder, overrides, repeat)
        if row is None:
            return JobResult(None, outcome, ok=outcome.status == "ok")
        row["predicted_peak_mem_mb"] = predicted["total"] if predicted else None
        row["predicted_step_time_ms"] = cfg["predicted_step_time_ms"]
        ok &= record_row(row, folder, results_file) and row_ok(row, cfg)
        rows.append(row)
        if outcome.status == "interrupted":
            break
    return JobResult(rows, outcome, ok=ok)


def row_ok(row: dict, cfg: dict) -> bool:
    """The run measured, and where it was to be checked against one device, it was, and it matched."""
    return row["status"] == "ok" and (not cfg["verify"] or row["parity_ok"] is True)


def record_row(row: dict, run_dir: Path, results_file: Path) -> bool:
    """The row into `<run_dir>/row.json` (the run's own copy, for `bench.report --from-run-folders` where a
    shared results file cannot be trusted, e.g. flock across NFS clients), then appended to the results file.
    False, and the user told, when the row could not be appended whole."""
    try:
        write_json_atomic(run_dir / "row.json", row)
    except OSError as exc:
        print(f"bench: warning: could not write {run_dir / 'row.json'}: {exc}", file=sys.stderr)
    try:
        append_row(results_file, row)
    except OSError as exc:
        print(f"bench: the row of {row['run_id']} could NOT be appended to {results_file}: {exc}", file=sys.stderr)
        return False
    return True


def run_once(cfg: dict, run_dir: Path, overrides: list[str], repeat: int):
    """Launch the ranks once and build the row: (row, how the launch ended); no row where another controller
    records it. Only result files stamped with this launch's id are read."""
    started_at = now()
    start = time.perf_counter()
    write_config(cfg, run_dir)
    outcome = launch(cfg, run_dir, WORKER)
    if not outcome.records_row:
        return None, outcome

    row = empty_row(cfg, run_dir, started_at, overrides, repeat)
    if cfg["repeats"] > 1:
        row["run_id"] = f"{run_dir.parent.name}/{run_dir.name}"
    row["slurm_job_id"] = outcome.slurm_job_id or os.environ.get("SLURM_JOB_ID")
    row["warnings"] += config_warnings(cfg)
    world = row["world_size"]
    ranks = read_rank_results(run_dir, world, outcome.launch_id)
    if len(ranks) == world:
        ordered = [ranks[r] for r in range(world)]
        measured = measured_fields(cfg, ordered, step_flops(cfg))
        row.update(measured, warnings=row["warnings"] + measured.pop("warnings", []))
        write_steps_csv(run_dir / "steps.csv", cfg["warmup"], ordered)
        if all(r.get("profile") for r in ordered):
            write_breakdown_csv(run_dir / "breakdown.csv", ordered)
        if cfg["verify"]:
            row.update(verify_parity(cfg, run_dir, ordered, row["warnings"]))
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


def step_flops(cfg: dict) -> dict:
    """The step's FLOP counts per sample (`bench.measure.flops`), counted here, once per model configuration
    and cached: the ranks never pay for it, and it is counted after they ended, so it cannot slow them."""
    import torch

    from bench.measure.flops import flop_counts

    key = {"model": cfg["model"], "activation_checkpointing": cfg["activation_checkpointing"],
           "torch": torch.__version__}
    return cached_json(cfg["results_dir"], "flops", key,
                       lambda: flop_counts(cfg["model"], cfg["activation_checkpointing"]))


def reference_run(cfg: dict) -> tuple[dict, Path]:
    """The single-device run a `verify=true` run is compared with: its rank's results and its parameters file.
    Run once, then cached by configuration; a cache that does not read back whole is run again."""
    ref_cfg = parity.reference_config(cfg)
    ref_dir = Path(cfg["results_dir"]) / ".parity-reference" / parity.reference_key(ref_cfg)
    cached = cached_reference(ref_dir)
    if cached is not None:
        return cached, ref_dir / "params.pt"
    ref_dir.mkdir(parents=True, exist_ok=True)
    (ref_dir / "reference.json").unlink(missing_ok=True)
    write_config(ref_cfg, ref_dir)
    log.info("verify: running the single-device reference in %s", ref_dir)
    outcome = launch(ref_cfg, ref_dir, WORKER)
    ranks = read_rank_results(ref_dir, 1, outcome.launch_id)
    if outcome.status != "ok" or 0 not in ranks or not (ref_dir / "params.pt").is_file():
        raise RuntimeError(f"the single-device reference run failed ({ref_dir}): {outcome.error}")
    write_json_atomic(ref_dir / "reference.json", {"launch_id": outcome.launch_id})
    return ranks[0], ref_dir / "params.pt"


def cached_reference(ref_dir: Path) -> dict | None:
    """The cached reference's rank result, if the cache is whole: its marker, its rank file from the same launch
    and a parameters file that loads."""
    import torch

    try:
        launch_id = json.loads((ref_dir / "reference.json").read_text())["launch_id"]
        torch.load(ref_dir / "params.pt", weights_only=True)
    except Exception:  # missing, cut off, not JSON, not a tensor file: run the reference again
        return None
    return read_rank_results(ref_dir, 1, launch_id).get(0)


def verify_parity(cfg: dict, run_dir: Path, ranks: list[dict], warnings: list[str]) -> dict:
    """Compare this run's losses and final parameters with the single-device reference. When the comparison
    cannot be made, the parity fields stay null and a warning says why (the run itself still measured)."""
    try:
        ref_rank, ref_params = reference_run(cfg)
        kind = strategy_spec(cfg["strategy"]["name"]).parity
        fields = parity.parity_fields(cfg, global_losses(ranks), run_dir / "params.pt", ref_rank["loss"],
                                      ref_params, kind)
    except Exception as exc:
        warnings.append(f"verify: not compared with one device: {type(exc).__name__}: {exc}")
        return {}
    if not fields["parity_ok"]:
        warnings.append(parity_warning(fields))
    return fields


def parity_warning(row: dict) -> str:
    return (f"parity FAILED: max relative difference {row['parity_max_rel_diff']:.3g} from strategy=single "
            f"(loss {row['parity_loss_max_rel_diff']:.3g}, parameters {row['parity_param_max_rel_diff']:.3g}) "
            f"exceeds the tolerance {row['parity_tolerance']:.0e}")


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
