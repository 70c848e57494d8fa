"""The controller: validate and resolve the config once, launch the ranks, record one row.

Runs inside the Hydra app (`python -m bench`); the ranks it starts never import Hydra.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from pathlib import Path

import yaml

from bench import parity
from bench.config import ConfigError, check_backend, parallel_degrees, resolve_device, validate
from bench.launch_inline import launch_inline
from bench.launch_slurm import check_available as check_slurm_available
from bench.launch_slurm import launch_slurm
from bench.launcher import LaunchOutcome, launch_local, launch_multinode
from bench.results import (
    append_row,
    base_row,
    global_losses,
    measured_fields,
    no_measurements,
    read_rank_results,
    write_steps_csv,
)
from bench.strategies import strategy_module
from bench.summary import print_summary

log = logging.getLogger("bench")

# launch.name -> launcher(cfg, run_dir, worker_module="bench.worker") -> LaunchOutcome
LAUNCHERS = {"local": launch_local, "multinode": launch_multinode, "inline": launch_inline, "slurm": launch_slurm}


def prepare(cfg: dict) -> dict:
    """Validate, then pin everything the ranks must agree on (the device) into the config."""
    validate(cfg)
    if cfg["launch"]["name"] == "slurm":
        check_slurm_available(cfg)
    cfg["parallel"] = parallel_degrees(cfg)  # the ranks get the degrees resolved, -1 inferred
    cfg["device"] = resolve_device(cfg["device"])
    check_backend(cfg["backend"], cfg["device"])
    if cfg["data"]["name"] == "files":
        from bench.files import ensure_dataset

        ensure_dataset(cfg)  # once, here, before any rank reads it
    if cfg["launch"]["name"] not in LAUNCHERS:
        raise ConfigError(f"launch: expected one of {sorted(LAUNCHERS)}, got {cfg['launch']['name']!r}")
    return cfg


def write_config(cfg: dict, run_dir: Path) -> None:
    """config.json (what the ranks read) and config.yaml, each replaced atomically: the controllers of a
    multi-node run, or the ranks of an inline run, may share one run folder on a shared filesystem."""
    run_dir.mkdir(parents=True, exist_ok=True)
    texts = {"config.json": json.dumps(cfg, indent=2), "config.yaml": yaml.safe_dump(cfg, sort_keys=False)}
    for name, text in texts.items():
        tmp = run_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)


def run(
    cfg: dict, run_dir: Path, results_file: Path, overrides: list[str]
) -> tuple[dict | None, LaunchOutcome]:
    """Launch one benchmark whose config is already prepared; append its row and return it with how the
    launch ended. The row is None where another controller records it (the nodes of a multi-node run that do
    not hold global rank 0, inline ranks other than 0)."""
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    write_config(cfg, run_dir)

    outcome = LAUNCHERS[cfg["launch"]["name"]](cfg, run_dir)
    if not outcome.records_row:
        return None, outcome

    row = base_row(cfg, run_dir, started_at, overrides)
    row["slurm_job_id"] = outcome.slurm_job_id or os.environ.get("SLURM_JOB_ID")
    world = row["world_size"]
    ranks = read_rank_results(run_dir, world)
    if len(ranks) == world:
        ordered = [ranks[r] for r in range(world)]
        row.update(measured_fields(cfg, ordered))
        write_steps_csv(run_dir / "steps.csv", cfg, ordered)
        if cfg["verify"]:
            row.update(verify_parity(cfg, run_dir, ordered))
            if not row["parity_ok"]:
                row["warnings"].append(parity_warning(row))
        if outcome.status != "ok":
            # Every rank handed in its results before something went wrong in teardown: the numbers stand.
            row["warnings"].append(f"{outcome.status} after every rank had written its results: {outcome.error}")
    else:
        missing = sorted(set(range(world)) - set(ranks))
        row.update(no_measurements())
        row["status"] = failure_status(outcome)
        row["failed_rank"] = outcome.first_failed_rank
        row["error"] = outcome.error or f"ranks {missing} exited without writing results"
    row["duration_s"] = time.perf_counter() - start
    append_row(results_file, row)
    return row, outcome


def reference_run(cfg: dict) -> Path:
    """The single-device run a `verify=true` run is compared with: run once, then cached by configuration."""
    ref_cfg = parity.reference_config(cfg)
    ref_dir = Path(cfg["results_dir"]) / ".parity-reference" / parity.reference_key(ref_cfg)
    if (ref_dir / "params.pt").is_file() and (ref_dir / "ranks" / "rank0.json").is_file():
        return ref_dir
    ref_dir.mkdir(parents=True, exist_ok=True)
    (ref_dir / "config.json").write_text(json.dumps(ref_cfg, indent=2))
    log.info("verify: running the single-device reference in %s", ref_dir)
    outcome = launch_local(ref_cfg, ref_dir)
    if outcome.status != "ok" or not (ref_dir / "params.pt").is_file():
        raise RuntimeError(f"the single-device reference run failed ({ref_dir}): {outcome.error}")
    return ref_dir


def verify_parity(cfg: dict, run_dir: Path, ranks: list[dict]) -> dict:
    """Compare this run's losses and final parameters with the single-device reference."""
    ref_dir = reference_run(cfg)
    (ref_rank,) = read_rank_results(ref_dir, 1).values()
    kind = strategy_module(cfg["strategy"]["name"]).PARITY
    return parity.parity_fields(cfg, global_losses(ranks), run_dir / "params.pt", ref_rank["loss"],
                                ref_dir / "params.pt", kind)


def parity_warning(row: dict) -> str:
    return (f"parity FAILED: max relative difference {row['parity_max_rel_diff']:.3g} from strategy=single "
            f"(loss {row['parity_loss_max_rel_diff']:.3g}, parameters {row['parity_param_max_rel_diff']:.3g}) "
            f"exceeds the tolerance {row['parity_tolerance']:.0e}")


OOM_MARKERS = ("OutOfMemoryError", "out of memory", "MemoryError")


def failure_status(outcome: LaunchOutcome) -> str:
    """A run without results: `oom` when its first failure ran out of memory, else how the launch ended."""
    if outcome.status == "failed":
        first = outcome.failed_ranks.get(outcome.first_failed_rank, "")
        return "oom" if any(marker in first for marker in OOM_MARKERS) else "failed"
    return outcome.status


def record_skipped(cfg: dict, run_dir: Path, results_file: Path, overrides: list[str], reason: str) -> None:
    """A sweep combination that cannot run: a `skipped` row with the reason, nothing launched."""
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    row = {**base_row(cfg, run_dir, started_at, overrides), **no_measurements()}
    row.update(status="skipped", error=reason, duration_s=0.0, slurm_job_id=os.environ.get("SLURM_JOB_ID"))
    append_row(results_file, row)


def report(row: dict, results_file: Path, outcome: LaunchOutcome) -> int:
    """Print the summary and return the process exit code for this run (128 + signal if interrupted)."""
    print_summary(row, str(results_file))
    if outcome.status == "interrupted":
        return 128 + outcome.signal
    return 0 if row["status"] == "ok" and row.get("parity_ok") is not False else 1
