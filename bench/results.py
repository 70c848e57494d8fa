"""One run -> one row: built from the ranks' result files, appended to runs.jsonl, plus steps.csv."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

from bench import metrics
from bench.mfu import lookup_peak_tflops, mfu_pct, tflops_per_device
from bench.models import model_module


def read_rank_results(run_dir: Path, world_size: int) -> dict[int, dict]:
    """The result files the ranks wrote before teardown (missing ones are ranks that died before)."""
    found = {}
    for rank in range(world_size):
        path = run_dir / "ranks" / f"rank{rank}.json"
        if path.exists():
            found[rank] = json.loads(path.read_text())
    return found


def git_sha() -> str | None:
    """The commit of the bench source that ran (None outside a git checkout, e.g. a wheel install)."""
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def base_row(cfg: dict, run_dir: Path, started_at: str, overrides: list[str]) -> dict:
    """The fields every row has, whatever happened to the run."""
    launch = cfg["launch"]
    return {
        "run_id": run_dir.name,
        "started_at": started_at,
        "status": None,
        "error": None,
        "failed_rank": None,
        "warnings": [],
        "strategy": cfg["strategy"]["name"],
        "model": cfg["model"]["name"],
        "data": cfg["data"]["name"],
        "launcher": launch["name"],
        "world_size": launch["nnodes"] * launch["nproc"],
        "nnodes": launch["nnodes"],
        "nproc": launch["nproc"],
        "global_batch": cfg["global_batch"],
        "steps": cfg["steps"],
        "warmup": cfg["warmup"],
        "device": cfg["device"],
        "python_version": platform.python_version(),
        "host": socket.gethostname(),
        "git_sha": git_sha(),
        "run_dir": str(run_dir),
        "overrides": overrides,
        "config": cfg,
    }


MEASURED_FIELDS = (
    "backend device_name params omp_num_threads samples_per_s samples_per_s_per_device tokens_per_s "
    "tokens_per_s_per_device step_time_ms_mean step_time_ms_p50 step_time_ms_p90 step_time_ms_p99 step_time_ms_std "
    "step_time_ms_min step_time_ms_max first_step_ms data_wait_pct peak_mem_mb peak_mem_reserved_mb "
    "cuda_alloc_retries cuda_ooms peak_rss_mb peak_rss_above_baseline_mb flops_per_step tflops_per_device "
    "peak_tflops mfu_pct matmul_precision loss_first loss_last torch_version cuda_version nccl_version "
    "devices mem_params_mb mem_grads_mb mem_optim_mb mem_activations_mb strategy_facts "
    "parity_loss_max_rel_diff parity_param_max_rel_diff parity_max_rel_diff parity_tolerance parity_ok"
).split()


def no_measurements() -> dict:
    """The measured fields of a run that measured nothing: present and null, so every row has one schema."""
    return dict.fromkeys(MEASURED_FIELDS)


def measured_fields(cfg: dict, ranks: list[dict]) -> dict:
    """Everything computed from the ranks' measurements (ranks ordered by rank)."""
    warmup = cfg["warmup"]
    devices = sum(r["devices"] for r in ranks)  # nn.DataParallel: one rank, several devices
    step_s = metrics.max_over_ranks([r["step_time_s"] for r in ranks])
    measured_s = step_s[warmup:]
    wait_s = metrics.max_over_ranks([r["data_wait_s"] for r in ranks])[warmup:]
    losses = global_losses(ranks)
    rank0 = ranks[0]

    tokens_per_sample = model_module(cfg["model"]).tokens_per_sample(cfg["model"])
    rates = metrics.throughput(cfg["global_batch"], measured_s, tokens_per_sample)
    stats = metrics.step_time_stats_ms(measured_s)
    flops_per_step = rank0["flops_per_sample"] * cfg["global_batch"]
    achieved = tflops_per_device(flops_per_step, stats["step_time_ms_mean"] / 1e3, devices)
    peak = cfg["peak_tflops"] or lookup_peak_tflops(rank0["device_name"], rank0["matmul_precision"])

    on_cuda = "cuda_peak_allocated_mb" in rank0
    peak_rss = max(r["peak_rss_mb"] for r in ranks)
    row = {
        "status": "ok",
        "backend": rank0["backend"],
        "device_name": rank0["device_name"],
        "params": rank0["params"],
        "omp_num_threads": rank0["num_threads"],
        "samples_per_s": rates["samples_per_s"],
        "samples_per_s_per_device": rates["samples_per_s"] / devices,
        "tokens_per_s": rates["tokens_per_s"],
        "tokens_per_s_per_device": rates["tokens_per_s"] / devices if rates["tokens_per_s"] else None,
        **stats,
        "first_step_ms": step_s[0] * 1e3,
        "data_wait_pct": 100.0 * sum(wait_s) / sum(measured_s),
        "peak_mem_mb": max(r["cuda_peak_allocated_mb"] for r in ranks) if on_cuda else peak_rss,
        "peak_mem_reserved_mb": max(r["cuda_peak_reserved_mb"] for r in ranks) if on_cuda else None,
        "cuda_alloc_retries": max(r["cuda_alloc_retries"] for r in ranks) if on_cuda else None,
        "cuda_ooms": max(r["cuda_ooms"] for r in ranks) if on_cuda else None,
        "peak_rss_mb": peak_rss,
        "peak_rss_above_baseline_mb": max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in ranks),
        "flops_per_step": flops_per_step,
        "tflops_per_device": achieved,
        "peak_tflops": peak,
        "mfu_pct": mfu_pct(achieved, peak),
        "matmul_precision": rank0["matmul_precision"],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "torch_version": rank0["torch_version"],
        "cuda_version": rank0["cuda_version"],
        "nccl_version": rank0["nccl_version"],
    }
    row.update(memory_breakdown(ranks, on_cuda))
    row.update(dict.fromkeys(k for k in MEASURED_FIELDS if k.startswith("parity_")))
    if peak is None:
        row["warnings"] = [
            f"mfu_pct is null: no peak TFLOP/s known for {rank0['device_name']!r} "
            f"({rank0['matmul_precision']}); pass peak_tflops=<number> to set one"
        ]
    return row


def global_losses(ranks: list[dict]) -> list[float]:
    """Per step, the global-batch loss from the ranks that hold one."""
    return metrics.mean_over_ranks([r["loss"] for r in ranks if r["loss"] is not None])


def memory_breakdown(ranks: list[dict], on_cuda: bool) -> dict:
    """Max over ranks of what each holds; the rest of its peak is activations and workspace."""
    fields = {k: max(r[k] for r in ranks) for k in ("mem_params_mb", "mem_grads_mb", "mem_optim_mb")}
    peak_key = "cuda_peak_allocated_mb" if on_cuda else None

    def rest(r: dict) -> float:
        peak = r[peak_key] if peak_key else r["peak_rss_mb"] - r["baseline_rss_mb"]
        return max(0.0, peak - r["mem_params_mb"] - r["mem_grads_mb"] - r["mem_optim_mb"])

    fields["mem_activations_mb"] = max(rest(r) for r in ranks)
    fields["devices"] = sum(r["devices"] for r in ranks)  # nn.DataParallel: one rank, several devices
    fields["strategy_facts"] = ranks[0]["strategy_facts"]
    return fields


def write_steps_csv(path: Path, cfg: dict, ranks: list[dict]) -> None:
    """Per-step record: the step's time (max over ranks), its loss, data wait and every rank's time."""
    step_s = metrics.max_over_ranks([r["step_time_s"] for r in ranks])
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
                    int(i >= cfg["warmup"]),
                    f"{t * 1e3:.4f}",
                    f"{losses[i]:.6f}" if losses else "",
                    f"{max(r['data_wait_s'][i] for r in ranks) * 1e3:.4f}",
                ]
                + [f"{r['step_time_s'][i] * 1e3:.4f}" for r in ranks]
            )


def read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a runs.jsonl, and one message per line that is not a JSON object (a crash mid-write by
    an older version, a hand edit): such lines are skipped, never fatal."""
    rows, problems = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{number}: skipped, not valid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{number}: skipped, not a JSON object")
                continue
            rows.append(row)
    return rows, problems


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line under an exclusive lock, so concurrent writers never interleave lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
