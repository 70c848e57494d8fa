"""Each layout's step time, predicted: compute at a device throughput, plus the communication that compute does
not hide, plus the pipeline's bubble.

    step = compute + bubble + exposed communication

- compute: the step's hardware FLOPs on this rank (`bench.measure.flops`: forward and backward, recompute
  included; a data- or tensor-parallel rank does 1/world of them, a pipeline stage 1/pp) divided by the
  rank's throughput: measured (`throughput`) or assumed (`plan.device_tflops`, or the device's peak x
  `plan.mfu_pct`).
- communication: the step's collectives (`bench.plan.collectives`) priced by the network's alpha-beta fits
  (`bench.plan.network`). Assumed: a fraction `plan.overlap` of the data-parallel collectives (DDP's and
  ZeRO's all-reduce, FSDP's all-gathers and reduce-scatters, ZeRO's broadcasts) hides behind compute; tensor
  parallelism's collectives sit on the critical path between its matmuls and hide nothing, nor do the
  pipeline's sends.
- bubble: a pipeline of pp stages and m micro-batches idles (pp - 1) of its m + pp - 1 slots (GPipe and
  1F1B; interleaving v stages per rank divides the bubble by v), and each slot also waits for its sends.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.launch.agent import threads_per_rank
from bench.plan.network import Network

DATA_PARALLEL = ("ddp", "zero", "fsdp")


def divisor(cfg: dict) -> int:
    """How many ways the step's FLOPs are split across ranks."""
    degrees = cfg["parallel"]
    return degrees["dp"] * degrees["tp"] * degrees["pp"]


def predict_step_ms(cfg: dict, flops_per_sample: float, rank_tflops: float, collectives: list[dict],
                    network: Network, overlap: float) -> dict:
    """{compute_ms, comm_ms, comm_exposed_ms, bubble_ms, step_ms} for one step of `cfg` on rank 0."""
    name = cfg["strategy"]["name"]
    compute_s = flops_per_sample * cfg["global_batch"] / divisor(cfg) / (rank_tflops * 1e12)
    comm_s = sum(network.call_s(c["collective"], c["ranks"], c["calls"], c["bytes"]) for c in collectives)
    bubble_s = 0.0
    exposed_s = comm_s * (1 - overlap) if name in DATA_PARALLEL else comm_s
    if name == "pipeline" and cfg["parallel"]["pp"] > 1:
        micro, pp = cfg["strategy"]["microbatches"], cfg["parallel"]["pp"]
        per_rank = max(cfg["strategy"].get("stages_per_rank", 1), 1)
        slots = (micro + (pp - 1) / per_rank) / micro  # the schedule's length in micro-batch slots, per slot of work
        bubble_s = compute_s * (slots - 1)
        exposed_s = comm_s = comm_s * slots
    return {"compute_ms": 1e3 * compute_s, "comm_ms": 1e3 * comm_s, "comm_exposed_ms": 1e3 * exposed_s,
            "bubble_ms": 1e3 * bubble_s, "step_ms": 1e3 * (compute_s + bubble_s + exposed_s)}


# ----------------------------------------------------------------------------- the rank's throughput


MATCH_KEYS = ("model", "precision", "activation_checkpointing", "compile", "data")


def measured_throughput(results_dir: str | Path, cfg: dict, device_name: str) -> dict | None:
    """The hardware TFLOP/s this model reached in `strategy=single` runs on this device (`<results_dir>/
    runs.jsonl`), at the measured global batch nearest the layout's per-rank batch: the median over the
    repeats there, and its threads (CPU: a rank's throughput is its share of the cores)."""
    path = Path(results_dir) / "runs.jsonl"
    if not path.is_file():
        return None
    runs = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        config = row.get("config") if isinstance(row, dict) else None
        if (row.get("status") == "ok" and isinstance(config, dict) and config.get("strategy", {}).get("name") ==
                "single" and row.get("device_name") == device_name and row.get("step_time_ms_p50")
                and row.get("hardware_flops_per_step") and all(config.get(k) == cfg.get(k) for k in MATCH_KEYS)):
            runs.append(row)
    if not runs:
        return None
    threads = rank_threads(cfg)
    if threads and any(r.get("omp_num_threads") == threads for r in runs):  # the rank's own share of the cores
        runs = [r for r in runs if r.get("omp_num_threads") == threads]
    per_rank = cfg["global_batch"] / divisor(cfg)
    batch = min({r["global_batch"] for r in runs}, key=lambda b: (abs(b - per_rank), -b))
    chosen = [r for r in runs if r["global_batch"] == batch]
    return {"tflops": statistics.median(r["hardware_flops_per_step"] / r["step_time_ms_p50"] / 1e9 for r in chosen),
            "threads": chosen[0].get("omp_num_threads"), "global_batch": batch, "runs": len(chosen)}


def rank_threads(cfg: dict) -> int | None:
    """The threads a CPU rank of this layout gets (None: torch's default, or not a CPU)."""
    if cfg["device"] != "cpu":
        return None
    return threads_per_rank(cfg["launch"]["nproc"], cfg["launch"]["omp_num_threads"])


def rank_tflops(cfg: dict, plan: dict, measured: dict | None, peak_tflops: float | None) -> tuple[float | None, str]:
    """One rank's throughput in the layout `cfg`, and where it comes from."""
    if plan["device_tflops"]:
        return float(plan["device_tflops"]), f"plan.device_tflops={plan['device_tflops']}"
    if measured:
        tflops, source = measured["tflops"], (f"measured: strategy=single, global_batch={measured['global_batch']}"
                                              f" ({measured['runs']} run(s))")
        if cfg["device"] == "cpu" and measured["threads"]:
            # ranks on one machine share its cores: a rank runs with its own thread count (linear in threads,
            # which underrates one thread: a single run at the rank's threads, `launch.omp_num_threads`, is better)
            threads = rank_threads(cfg) or measured["threads"]
            if threads != measured["threads"]:
                tflops *= threads / measured["threads"]
                source += f", scaled from {measured['threads']} to {threads} thread(s)"
        return tflops, source
    if peak_tflops:
        return peak_tflops * plan["mfu_pct"] / 100, f"assumed: {plan['mfu_pct']}% of a {peak_tflops:g} TFLOP/s peak"
    return None, ("no throughput: run `python -m bench strategy=single` on this model once, or set "
                  "plan.device_tflops")
