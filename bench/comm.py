"""`python -m bench.comm [overrides]`: the collectives micro-benchmark, launched like a benchmark run.

all_reduce, all_gather, reduce_scatter, broadcast and all_to_all over message sizes (powers of two from
`comm.min_bytes` to `comm.max_bytes`), with the launchers of `python -m bench` (local, multinode, slurm,
inline) and the ranks in `bench.comm_worker`. One row per collective x size is appended to
`<results_dir>/comm.jsonl` (in a multirun: the sweep folder's), in the format of runs.jsonl (same base fields,
status, error, config); the run folder gets `comm.csv` and `busbw_<collective>.png`.

Bandwidths as nccl-tests define them (its PERFORMANCE.md), in GB/s (1e9 bytes/s):
  algbw = size_bytes / time,  busbw = algbw * factor,
  factor: all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all (n-1)/n; broadcast 1,
where `size_bytes` is nccl-tests' size: the whole buffer (all_gather: the gathered output, reduce_scatter: the
input, all_to_all: what each rank sends) and `time` the time of one call, max over ranks.
"""

from __future__ import annotations

import datetime as dt
import platform
import socket
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bench.__main__ import _conf_dir
from bench.config import (
    ConfigError,
    _check_cuda,
    _check_launch,
    _positive_int,
    check_backend,
    check_run_keys,
    reject,
    resolve_device,
)
from bench.controller import LAUNCHERS, failure_status, write_config
from bench.launch_env import prepare_argv
from bench.launch_slurm import check_available as check_slurm_available
from bench.launcher import LaunchOutcome
from bench.results import append_row, git_sha

WORKER = "bench.comm_worker"
RESULTS_FILE = "comm.jsonl"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
DTYPES = ("float32", "float16", "bfloat16", "float64")
MEASURED = (
    "variant size_bytes count time_us time_us_min_rank algbw_gbps busbw_gbps busbw_factor backend device_name "
    "omp_num_threads torch_version cuda_version nccl_version"
).split()


def busbw_factor(collective: str, n: int) -> float:
    """nccl-tests' bus bandwidth factor: busbw = algbw * factor."""
    if collective == "all_reduce":
        return 2 * (n - 1) / n
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if collective == "broadcast":
        return 1.0
    raise ValueError(f"unknown collective {collective!r}")


def bandwidths(collective: str, size_bytes: int, seconds: float, n: int) -> dict:
    algbw = size_bytes / seconds / 1e9
    factor = busbw_factor(collective, n)
    return {"algbw_gbps": algbw, "busbw_gbps": algbw * factor, "busbw_factor": factor}


def _int(cfg: dict, key: str, minimum: int) -> None:
    node = cfg
    for part in key.split("."):
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int) or node < minimum:
        reject(key, f"an integer >= {minimum}", node)


def prepare(cfg: dict) -> dict:
    """Check the config (the launch keys as `python -m bench` does) and pin the device."""
    _check_launch(cfg)
    _positive_int(cfg, "launch.nproc")
    _positive_int(cfg, "launch.nnodes")
    world = cfg["launch"]["nnodes"] * cfg["launch"]["nproc"]
    if world < 2:
        reject("launch.nproc", "a world of at least 2 ranks (launch.nnodes x launch.nproc): one rank moves no data", 1)
    check_run_keys(cfg)
    comm = cfg["comm"]
    collectives = comm["collectives"]
    if not isinstance(collectives, list) or not collectives or set(collectives) - set(COLLECTIVES):
        reject("comm.collectives", f"a non-empty list drawn from {', '.join(COLLECTIVES)}", collectives)
    _int(cfg, "comm.min_bytes", 1)
    if comm["max_bytes"] is not None:
        _int(cfg, "comm.max_bytes", comm["min_bytes"])
    if comm["dtype"] not in DTYPES:
        reject("comm.dtype", f"one of {', '.join(DTYPES)}", comm["dtype"])
    _int(cfg, "comm.warmup_iters", 0)
    _int(cfg, "comm.iters", 1)
    if not isinstance(comm["check"], bool):
        reject("comm.check", "true or false", comm["check"])
    if cfg["device"] in ("cuda", "auto") and cfg["launch"]["name"] != "slurm":
        _check_cuda(cfg)
    if cfg["launch"]["name"] == "slurm":
        check_slurm_available(cfg)
    cfg["device"] = resolve_device(cfg["device"])
    check_backend(cfg["backend"], cfg["device"])
    return cfg


def base_row(cfg: dict, run_dir: Path, started_at: str, overrides: list[str]) -> dict:
    launch = cfg["launch"]
    return {
        "run_id": run_dir.name,
        "started_at": started_at,
        "status": None,
        "error": None,
        "failed_rank": None,
        "warnings": [],
        "kind": "comm",
        "collective": None,
        **dict.fromkeys(MEASURED),
        "dtype": cfg["comm"]["dtype"],
        "warmup_iters": cfg["comm"]["warmup_iters"],
        "iters": cfg["comm"]["iters"],
        "checked": cfg["comm"]["check"],
        "launcher": launch["name"],
        "world_size": launch["nnodes"] * launch["nproc"],
        "nnodes": launch["nnodes"],
        "nproc": launch["nproc"],
        "device": cfg["device"],
        "python_version": platform.python_version(),
        "host": socket.gethostname(),
        "git_sha": git_sha(),
        "slurm_job_id": None,
        "duration_s": None,
        "run_dir": str(run_dir),
        "overrides": overrides,
        "config": cfg,
    }


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


def run(cfg: dict, run_dir: Path, results_file: Path, overrides: list[str]) -> tuple[list[dict] | None, LaunchOutcome]:
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    write_config(cfg, run_dir)
    (run_dir / "comm.json").unlink(missing_ok=True)
    outcome = LAUNCHERS[cfg["launch"]["name"]](cfg, run_dir, worker_module=WORKER)
    if not outcome.records_row:
        return None, outcome
    base = base_row(cfg, run_dir, started_at, overrides)
    base["slurm_job_id"] = outcome.slurm_job_id
    result_path = run_dir / "comm.json"
    if result_path.is_file():
        import json

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
    return rows, outcome


CSV_COLUMNS = "collective variant size_bytes count time_us time_us_min_rank algbw_gbps busbw_gbps busbw_factor".split()


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        out.writeheader()
        out.writerows(rows)


def plot_busbw(run_dir: Path, rows: list[dict]) -> list[Path]:
    """busbw vs message size, one PNG per collective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    first = rows[0]
    for collective in dict.fromkeys(r["collective"] for r in rows):
        points = sorted((r["size_bytes"], r["busbw_gbps"]) for r in rows if r["collective"] == collective)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(f"{collective}: {first['world_size']} ranks, {first['backend']} on {first['device']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = run_dir / f"busbw_{collective}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:g} {unit}"
        size /= 1024
    return str(size)


def print_summary(rows: list[dict], results_file: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    measured = [r for r in rows if r["status"] == "ok"]
    first = rows[0]
    if measured:
        collectives = list(dict.fromkeys(r["collective"] for r in measured))
        table = Table(
            title=f"bench.comm {first['run_id']}: busbw GB/s, {first['world_size']} ranks, {first['backend']} "
            f"on {first['device_name']}",
            title_justify="left",
        )
        table.add_column("size", justify="right")
        for c in collectives:
            table.add_column(c, justify="right")
        by_key = {(r["collective"], r["size_bytes"]): r for r in measured}
        for size in sorted({r["size_bytes"] for r in measured}):
            cells = [f"{by_key[(c, size)]['busbw_gbps']:.3f}" if (c, size) in by_key else "-" for c in collectives]
            table.add_row(_human(size), *cells)
        console.print(table)
    for r in rows:
        if r["status"] != "ok":
            label = f"{r['status']}{' ' + r['collective'] if r['collective'] else ''}"
            console.print(f"[red]{label}:[/red] ", end="")
            console.print(r["error"], markup=False)
    for warning in dict.fromkeys(w for r in rows for w in r["warnings"]):
        console.print("[yellow]warning:[/yellow] ", end="")
        console.print(warning, markup=False)
    console.print(f"run folder: {first['run_dir']}\n{len(rows)} rows appended to: {results_file}")


_exit_codes: list[int] = []


@hydra.main(version_base=None, config_path=_conf_dir(), config_name="comm")
def _app(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        results_file = Path(hydra_cfg.sweep.dir).resolve() / RESULTS_FILE
    else:
        results_file = Path(cfg.results_dir).resolve() / RESULTS_FILE
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["results_dir"] = str(Path(plain["results_dir"]).resolve())
    try:
        plain = prepare(plain)
    except ConfigError as exc:
        print(f"bench.comm: invalid config: {exc}", file=sys.stderr)
        _exit_codes.append(2)
        return
    rows, outcome = run(plain, run_dir, results_file, list(hydra_cfg.overrides.task))
    if rows is None:
        print(f"bench.comm: {outcome.note}", file=sys.stderr)
        _exit_codes.append(0 if outcome.status == "ok" else 1)
        return
    print_summary(rows, results_file)
    if outcome.status == "interrupted":
        sys.exit(128 + outcome.signal)
    _exit_codes.append(0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1)


def main() -> None:
    sys.argv = prepare_argv(sys.argv, run_name="comm")
    _app()
    sys.exit(max(_exit_codes, default=0))


if __name__ == "__main__":
    main()
