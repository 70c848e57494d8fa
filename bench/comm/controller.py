"""The collectives benchmark's controller: check the config, launch the ranks (`bench.comm.worker`) with any of
bench's launchers, turn rank 0's measurements into one row per collective x message size.

Rows go to `<results_dir>/comm.jsonl` (in a sweep: the sweep folder's) in the format of runs.jsonl (the same
run fields, status, error and config) with `kind: "comm"`; the run folder gets `comm.csv` and a busbw plot
per collective. Bandwidths as nccl-tests define them: see `bench.measure.bandwidth`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.app import JobResult, now
from bench.checks import check_run_keys, pin_device
from bench.comm.collectives import COLLECTIVES, MESSAGE_DTYPES
from bench.comm.output import plot_busbw, write_csv
from bench.errors import integer_at_least, reject
from bench.launch import Worker, failure_status, launch
from bench.measure.bandwidth import bandwidths
from bench.parallel.topology import world_size
from bench.results import append_row, run_fields
from bench.runfolder import COMM, write_config

WORKER = Worker("bench.comm.worker", "measure_collectives")
MEASURED = (
    "variant size_bytes count time_us time_us_min_rank algbw_gbps busbw_gbps busbw_factor backend device_name "
    "omp_num_threads torch_version cuda_version nccl_version"
).split()


def prepare(cfg: dict) -> dict:
    """Check the config (the run keys as `python -m bench` does, then `comm.*`) and pin the device."""
    check_run_keys(cfg)
    if world_size(cfg) < 2:
        reject("launch.nproc", "a world of at least 2 ranks (launch.nnodes x launch.nproc): one rank moves no data",
               cfg["launch"]["nproc"])
    comm = cfg["comm"]
    collectives = comm["collectives"]
    if not isinstance(collectives, list) or not collectives or set(collectives) - set(COLLECTIVES):
        reject("comm.collectives", f"a non-empty list drawn from {', '.join(COLLECTIVES)}", collectives)
    integer_at_least(cfg, "comm.min_bytes", 1)
    if comm["max_bytes"] is not None:
        integer_at_least(cfg, "comm.max_bytes", comm["min_bytes"])
    if comm["dtype"] not in MESSAGE_DTYPES:
        reject("comm.dtype", f"one of {', '.join(MESSAGE_DTYPES)}", comm["dtype"])
    integer_at_least(cfg, "comm.warmup_iters", 0)
    integer_at_least(cfg, "comm.iters", 1)
    if not isinstance(comm["check"], bool):
        reject("comm.check", "true or false", comm["check"])
    if not isinstance(cfg["progress"], bool):
        reject("progress", "true or false", cfg["progress"])
    pin_device(cfg)
    return cfg


def empty_row(cfg: dict, run_dir: Path, started_at: str, overrides: list[str]) -> dict:
    """A comm row with nothing measured: which run, how it was asked for, the measured fields null."""
    comm = cfg["comm"]
    row = run_fields(cfg, run_dir, started_at, overrides)
    row.update(kind="comm", collective=None, dtype=comm["dtype"], warmup_iters=comm["warmup_iters"],
               iters=comm["iters"], checked=comm["check"])
    return {**row, **dict.fromkeys(MEASURED)}


def rows_from_result(base: dict, result: dict) -> list[dict]:
    """One row per measured (collective, size), then one `skipped` row per collective the backend lacks."""
    n = result["world_size"]
    common = {
        "backend": result["backend"],
        "device_name": result["device_name"],
        "omp_num_threads": result["num_threads"],
        "torch_version": result["torch_version"],
        "cuda_version": result["cuda_version"],
        "nccl_version": result["nccl_version"],
    }
    rows = []
    for m in result["measurements"]:
        row = {**base, **common, "status": "ok", "warnings": list(base["warnings"]) + result["warnings"]}
        row.update(
            collective=m["collective"],
            variant=m["variant"],
            size_bytes=m["size_bytes"],
            count=m["count"],
            time_us=m["time_s_max_rank"] * 1e6,
            time_us_min_rank=m["time_s_min_rank"] * 1e6,
            **bandwidths(m["collective"], m["size_bytes"], m["time_s_max_rank"], n),
        )
        rows.append(row)
    for collective, why in result["skipped"].items():
        rows.append({**base, **common, "status": "skipped", "collective": collective, "error": why})
    return rows


def run_collectives(cfg: dict, run_dir: Path, results_file: Path, overrides: list[str]) -> JobResult:
    started_at = now()
    start = time.perf_counter()
    write_config(cfg, run_dir)
    result_path = run_dir / COMM
    result_path.unlink(missing_ok=True)  # a reused run folder: read only what this run wrote
    outcome = launch(cfg, run_dir, WORKER)
    if not outcome.records_row:
        return JobResult(None, outcome, ok=outcome.status == "ok")
    base = empty_row(cfg, run_dir, started_at, overrides)
    base["slurm_job_id"] = outcome.slurm_job_id
    if result_path.is_file():
        if outcome.status != "ok":
            base["warnings"].append(f"{outcome.status} after rank 0 had written the results: {outcome.error}")
        rows = rows_from_result(base, json.loads(result_path.read_text()))
    else:
        error = outcome.error or "rank 0 wrote no results"
        rows = [{**base, "status": failure_status(outcome), "error": error, "failed_rank": outcome.first_failed_rank}]
    duration = time.perf_counter() - start
    for row in rows:
        row["duration_s"] = duration
        append_row(results_file, row)
    measured = [r for r in rows if r["status"] == "ok"]
    if measured:
        write_csv(run_dir / "comm.csv", measured)
        plot_busbw(run_dir, measured)
    return JobResult(rows, outcome, ok=all(r["status"] in ("ok", "skipped") for r in rows))
