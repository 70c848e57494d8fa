"""From the ranks' measurements to the measured fields of a training run's row. Pure: dicts in, dicts out.

Conventions: a step lasts as long as its slowest rank (max over ranks); warm-up steps are excluded from every
statistic; memory figures are the max over ranks (pipeline stages differ); throughput counts the global batch.
"""

from __future__ import annotations

from bench.measure import stats
from bench.measure.mfu import lookup_peak_tflops, mfu_pct, tflops_per_device
from bench.models import model_spec

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
    step_s = stats.max_over_ranks([r["step_time_s"] for r in ranks])
    measured_s = step_s[warmup:]
    wait_s = stats.max_over_ranks([r["data_wait_s"] for r in ranks])[warmup:]
    losses = global_losses(ranks)
    rank0 = ranks[0]

    tokens_per_sample = model_spec(cfg["model"]).tokens_per_sample(cfg["model"])
    rates = stats.throughput(cfg["global_batch"], measured_s, tokens_per_sample)
    step_stats = stats.step_time_stats_ms(measured_s)
    flops_per_step = rank0["flops_per_sample"] * cfg["global_batch"]
    achieved = tflops_per_device(flops_per_step, step_stats["step_time_ms_mean"] / 1e3, devices)
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
        **step_stats,
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
    return stats.mean_over_ranks([r["loss"] for r in ranks if r["loss"] is not None])


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
