"""From the ranks' measurements to the measured fields of a training run's row. Pure: dicts in, dicts out.

Conventions: a step lasts as long as its slowest rank (max over ranks: the percentiles); the measured steps
take as long as the slowest rank's total over them (throughput, the mean, MFU); warm-up steps are excluded from every
statistic; memory is the peak of the rank that holds the most (pipeline stages differ); throughput counts the
global batch.
"""

from __future__ import annotations

from bench.measure import stats
from bench.measure.breakdown import breakdown_fields, stragglers
from bench.measure.mfu import lookup_peak_tflops, mfu_pct, tflops_per_device

MEASURED_FIELDS = (
    "backend device_name params omp_num_threads samples_per_s samples_per_s_per_device tokens_per_s "
    "tokens_per_s_per_device step_time_ms_mean step_time_ms_p50 step_time_ms_p90 step_time_ms_p99 step_time_ms_std "
    "step_time_ms_min step_time_ms_max first_step_ms data_wait_pct step_timer oversubscribed "
    "peak_mem_mb mem_params_mb mem_buffers_mb mem_grads_mb mem_optim_mb mem_activations_mb mem_temp_mb "
    "mem_other_mb cuda_peak_allocated_mb cuda_peak_reserved_mb cuda_alloc_retries cuda_ooms peak_rss_mb "
    "peak_rss_above_baseline_mb setup_peak_mb model_flops_per_step model_flops_causal_per_step "
    "hardware_flops_per_step flops_convention "
    "flops_method "
    "tflops_per_device hardware_tflops_per_device peak_tflops peak_source mfu_pct mfu_causal_pct hfu_pct "
    "matmul_precision "
    "loss_first loss_last "
    "torch_version cuda_version nccl_version devices strategy_facts "
    "parity_loss_max_rel_diff parity_param_max_rel_diff parity_max_rel_diff parity_tolerance parity_ok "
    "profile_steps profile_step_time_ms compute_pct comm_pct comm_exposed_pct comm_exposed_pct_max overlap_pct "
    "profile_data_wait_pct idle_pct comm_by_collective_ms straggler_rank straggler_share_pct straggler_late_ms"
).split()
MEMORY_KINDS = ("params", "buffers", "grads", "optim", "activations", "temp", "other")


def no_measurements() -> dict:
    """The measured fields of a run that measured nothing: present and null, so every row has one schema."""
    return dict.fromkeys(MEASURED_FIELDS)


def measured_fields(cfg, ranks: list[dict], flops: dict, tokens_per_sample: int | None) -> dict:
    """Everything computed from the ranks' measurements (ranks ordered by rank), the step's FLOP counts
    (`bench.measure.flops.flop_counts`, per sample) and the model's tokens per sample (None: no tokens/s)."""
    warmup = cfg["warmup"]
    devices = sum(r["devices"] for r in ranks)  # nn.DataParallel: one rank, several devices
    step_s = stats.max_over_ranks([r["step_time_s"] for r in ranks])
    measured_s = step_s[warmup:]
    elapsed_s = stats.slowest_rank_total([r["step_time_s"][warmup:] for r in ranks])
    wait_s = stats.max_over_ranks([r["data_wait_s"] for r in ranks])[warmup:]
    losses = global_losses(ranks)
    rank0 = ranks[0]

    rates = stats.throughput(cfg["global_batch"], len(measured_s), elapsed_s, tokens_per_sample)
    # the distribution is the slowest rank's per step; the mean is the time the steps took, as throughput's
    step_stats = stats.step_time_stats_ms(measured_s) | {"step_time_ms_mean": elapsed_s / len(measured_s) * 1e3}
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
        "step_timer": rank0["step_timer"],
        **memory_fields(ranks),
        "matmul_precision": rank0["matmul_precision"],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "torch_version": rank0["torch_version"],
        "cuda_version": rank0["cuda_version"],
        "nccl_version": rank0["nccl_version"],
        "devices": devices,
        "strategy_facts": rank0["strategy_facts"],
    }
    row.update(flops_fields(cfg, flops, step_stats["step_time_ms_mean"] / 1e3, devices, rank0))
    row.update(profile_fields(ranks))
    crowded = oversubscribed_hosts(ranks)
    row["oversubscribed"] = bool(crowded)
    if crowded:
        row["warnings"] = row.get("warnings", []) + [
            f"oversubscribed: {crowded}; ranks wait for cores, so these timings measure the machine's crowding, "
            "not the strategy (fewer ranks, or launch.omp_num_threads)"
        ]
    row.update(dict.fromkeys(k for k in MEASURED_FIELDS if k.startswith("parity_")))
    return row


def flops_fields(cfg: dict, flops: dict, step_s: float, devices: int, rank0: dict) -> dict:
    """FLOPs per step by both conventions, what each achieved per device, and MFU/HFU against the peak the row
    names: given (`peak_tflops=<number>`), measured on the run's device (`peak_tflops=measure`) or the table's.
    A count that could not be made (`flop_counts`) is null, and so is what follows from it, with a warning."""
    model, causal, hardware = (None if f is None else f * cfg["global_batch"]
                               for f in (flops["model_flops_per_sample"], flops.get("model_flops_causal_per_sample"),
                                         flops["hardware_flops_per_sample"]))
    achieved, achieved_causal, achieved_hw = (None if f is None else tflops_per_device(f, step_s, devices)
                                              for f in (model, causal, hardware))
    peak, source = resolve_peak(cfg["peak_tflops"], rank0)
    fields = {
        "model_flops_per_step": model,
        "model_flops_causal_per_step": causal,
        "hardware_flops_per_step": hardware,
        "flops_convention": flops["flops_convention"],
        "flops_method": flops.get("flops_method"),
        "tflops_per_device": achieved,
        "hardware_tflops_per_device": achieved_hw,
        "peak_tflops": peak,
        "peak_source": source,
        "mfu_pct": None if achieved is None else mfu_pct(achieved, peak),
        "mfu_causal_pct": None if achieved_causal is None else mfu_pct(achieved_causal, peak),
        "hfu_pct": None if achieved_hw is None else mfu_pct(achieved_hw, peak),
    }
    warnings = []
    if flops.get("flops_error"):
        warnings.append(f"flops: {flops['flops_error']}; counted by {flops.get('flops_method') or 'nothing'}, "
                        "the FLOP fields it cannot give are null")
    if peak is None:
        warnings.append(
            f"mfu_pct is null: no peak TFLOP/s known for {rank0['device_name']!r} ({rank0['matmul_precision']}); "
            "pass peak_tflops=measure to measure one on the device, or peak_tflops=<number>"
        )
    if warnings:
        fields["warnings"] = warnings
    return fields


def profile_fields(ranks: list[dict]) -> dict:
    """Where the profiled steps' time went and which rank the others waited for (`bench.measure.breakdown`);
    null for a run that was not profiled."""
    if any(r.get("profile") is None for r in ranks):
        return {}
    fields = breakdown_fields([r["profile"]["steps"] for r in ranks])
    late = stragglers([r["profile"]["collectives"] for r in ranks])
    late.pop("last_in")
    return {**fields, **late}


def oversubscribed_hosts(ranks: list[dict]) -> str:
    """The hosts whose ranks run more threads than the cores they see, as `host: 16 threads on 2 cores`."""
    by_host: dict[str, list[dict]] = {}
    for r in ranks:
        by_host.setdefault(r["host"], []).append(r)
    crowded = []
    for host, mine in by_host.items():
        threads, cores = sum(r["num_threads"] for r in mine), max(r["cores"] for r in mine)
        if threads > cores:
            crowded.append(f"{host}: {len(mine)} ranks x threads = {threads} threads on {cores} cores")
    return "; ".join(crowded)


def resolve_peak(requested, rank0: dict) -> tuple[float | None, str | None]:
    if requested == "measure":
        return rank0["measured_peak_tflops"], "measured"
    if requested is not None:
        return float(requested), "given"
    peak = lookup_peak_tflops(rank0["device_name"], rank0["matmul_precision"])
    return peak, "table" if peak is not None else None


def memory_fields(ranks: list[dict]) -> dict:
    """The tensors held at the peak of the untimed tracked step, by kind, on the rank whose peak is highest
    (pipeline stages and uneven shards differ); the CUDA allocator's peaks over the timed steps and the
    process RSS, max over ranks, as secondary figures."""
    top = max(ranks, key=lambda r: r["tracked_memory_mb"]["total"])["tracked_memory_mb"]
    fields = {"peak_mem_mb": top["total"], **{f"mem_{kind}_mb": top[kind] for kind in MEMORY_KINDS}}
    on_cuda = "cuda_peak_allocated_mb" in ranks[0]
    for key in ("cuda_peak_allocated_mb", "cuda_peak_reserved_mb", "cuda_alloc_retries", "cuda_ooms"):
        fields[key] = max(r[key] for r in ranks) if on_cuda else None
    fields["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ranks)
    fields["peak_rss_above_baseline_mb"] = max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in ranks)
    fields["setup_peak_mb"] = max(r["setup_peak_mb"] for r in ranks)
    return fields


def global_losses(ranks: list[dict]) -> list[float]:
    """Per step, the global-batch loss from the ranks that hold one."""
    return stats.mean_over_ranks([r["loss"] for r in ranks if r["loss"] is not None])


def steps_table(warmup: int, ranks: list[dict]) -> list[list]:
    """steps.csv's lines, header first: per step, its time (max over ranks), whether it is measured (not warm-up),
    its loss, the longest data wait and every rank's time (ms)."""
    step_s = stats.max_over_ranks([r["step_time_s"] for r in ranks])
    losses = global_losses(ranks)
    lines: list[list] = [["step", "measured", "step_time_ms", "loss", "data_wait_ms_max"]
                         + [f"step_time_ms_rank{r['rank']}" for r in ranks]]
    for i, t in enumerate(step_s):
        lines.append([i, int(i >= warmup), f"{t * 1e3:.4f}", f"{losses[i]:.6f}" if losses else "",
                      f"{max(r['data_wait_s'][i] for r in ranks) * 1e3:.4f}"]
                     + [f"{r['step_time_s'][i] * 1e3:.4f}" for r in ranks])
    return lines
