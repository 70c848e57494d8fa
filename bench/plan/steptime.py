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
import math
import os
import statistics
from pathlib import Path

from bench.launch.agent import threads_per_rank
from bench.plan.network import Network
from bench.results import rows_if_any

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
    costs = [(c["collective"], network.call_s(c["collective"], c["ranks"], c["calls"], c["bytes"]))
             for c in collectives]
    comm_s = sum(cost for _, cost in costs)
    bubble_s = 0.0
    exposed_s = comm_s * (1 - overlap) if name in DATA_PARALLEL else comm_s
    if name == "pipeline" and cfg["parallel"]["pp"] > 1:
        micro, pp = cfg["strategy"]["microbatches"], cfg["parallel"]["pp"]
        per_rank = max(cfg["strategy"].get("stages_per_rank", 1), 1)
        slots = (micro + (pp - 1) / per_rank) / micro  # the schedule's length in micro-batch slots, per slot of work
        bubble_s = compute_s * (slots - 1)
        sends = sum(cost for kind, cost in costs if kind == "p2p")
        exposed_s = comm_s = sends * slots + (comm_s - sends)  # sends wait in every slot, the dp all-reduce once
    return {"compute_ms": 1e3 * compute_s, "comm_ms": 1e3 * comm_s, "comm_exposed_ms": 1e3 * exposed_s,
            "bubble_ms": 1e3 * bubble_s, "step_ms": 1e3 * (compute_s + bubble_s + exposed_s)}


# ----------------------------------------------------------------------------- the rank's throughput


MATCH_KEYS = ("model", "precision", "activation_checkpointing", "compile", "data")


def measured_runs(results_dir: str | Path, cfg: dict, device_name: str, match_model: bool = True) -> list[dict]:
    """The `ok` rows in `<results_dir>/runs.jsonl` of this model on this device, run as `cfg` would run it
    (`MATCH_KEYS`): what predictions are calibrated by and checked against. Without `match_model`, any model's
    run with the same data, precision, checkpointing and compilation."""
    keys = MATCH_KEYS if match_model else tuple(k for k in MATCH_KEYS if k != "model")
    return [row for row in rows_if_any(Path(results_dir) / "runs.jsonl")
            if row.get("status") == "ok" and row.get("device_name") == device_name
            and isinstance(row.get("config"), dict) and all(row["config"].get(k) == cfg.get(k) for k in keys)]


def measured_throughput(results_dir: str | Path, cfg: dict, device_name: str) -> dict | None:
    """The hardware TFLOP/s this model reached in `strategy=single` runs on this device (`<results_dir>/
    runs.jsonl`), at the measured global batch nearest (by ratio) the layout's per-device batch (CPU: the
    machine's, from a run on all its cores): the median over the repeats there, and its threads."""
    runs = [row for row in measured_runs(results_dir, cfg, device_name)
            if row["config"].get("strategy", {}).get("name") == "single" and row.get("step_time_ms_p50")
            and row.get("hardware_flops_per_step")]
    if not runs:
        return None
    target = cfg["global_batch"] / divisor(cfg)  # a device's share of the step
    if cfg["device"] == "cpu":
        # ranks on one machine share its cores: the machine's own throughput, from a run that used them all, on
        # the machine's share of the step (measured here: 2 concurrent 1-thread ranks run slower than one
        # 1-thread process alone, which predicted DDP's step 20% short)
        if any(r.get("omp_num_threads") == machine_cores() for r in runs):
            runs = [r for r in runs if r.get("omp_num_threads") == machine_cores()]
        target = cfg["global_batch"] / divisor(cfg) * cfg["launch"]["nproc"]
    batch = min({r["global_batch"] for r in runs}, key=lambda b: (abs(math.log(b / target)), -b))  # by ratio
    chosen = [r for r in runs if r["global_batch"] == batch]
    return {"tflops": statistics.median(r["hardware_flops_per_step"] / r["step_time_ms_p50"] / 1e9 for r in chosen),
            "threads": chosen[0].get("omp_num_threads"), "global_batch": batch, "runs": len(chosen)}


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
            # a rank's share of the machine: its threads, or its share of the cores when ranks x threads exceed
            # them (linear in threads: a run on all the machine's cores measures the machine best)
            share = core_share(cfg)
            if share != measured["threads"]:
                tflops *= share / measured["threads"]
                source += f", {share:g} of the {measured['threads']} thread(s) it ran on per rank"
        return tflops, source
    if peak_tflops:
        return peak_tflops * plan["mfu_pct"] / 100, f"assumed: {plan['mfu_pct']}% of a {peak_tflops:g} TFLOP/s peak"
    return None, ("no throughput: run `python -m bench strategy=single` on this model once, or set "
                  "plan.device_tflops")


# ----------------------------------------------------------------------------- the model, calibrated


class StepTimeModel:
    """Predicts a layout's step time (`predict`), and what this strategy's measured runs here say of such
    predictions (`overhead`, a factor or a difference), which carries what FLOPs and bytes leave out (FSDP's
    copies into and out of its flat buffers, DTensor's dispatch, gloo's threads taking the cores compute needs)
    to the layouts not run. A layout's own runs (this model, world size and global batch) are never used, so a
    prediction is never its own measurement."""

    def __init__(self, base: dict, network: Network, device_name: str, peak_tflops: float | None):
        self.base, self.plan, self.network, self.device_name = base, base["plan"], network, device_name
        self.peak_tflops = peak_tflops
        self.sizes: dict[str, dict] = {}  # by model configuration

    def model_sizes(self, model_cfg: dict) -> dict:
        from bench.plan.collectives import model_sizes

        key = json.dumps(model_cfg, sort_keys=True)
        if key not in self.sizes:
            self.sizes[key] = model_sizes(model_cfg)
        return self.sizes[key]

    def predict(self, cfg: dict, memory: dict | None) -> tuple[dict | None, float | None, str]:
        """(the step's parts in ms, the rank's TFLOP/s, where the throughput came from)."""
        from bench.controller import step_flops
        from bench.plan.collectives import per_step

        tflops, source = rank_tflops(cfg, self.plan, measured_throughput(self.base["results_dir"], cfg,
                                                                          self.device_name), self.peak_tflops)
        if tflops is None:
            return None, None, source
        sizes = self.model_sizes(cfg["model"])
        collectives = (memory or {}).get("collectives", []) + per_step(
            cfg, sizes["params"], sizes["param_tensors"], sizes["boundary_bytes_per_sample"])
        flops = step_flops(cfg)["hardware_flops_per_sample"]
        return predict_step_ms(cfg, flops, tflops, collectives, self.network, self.plan["overlap"]), tflops, source

    def overhead(self, cfg: dict) -> tuple[float, float, str]:
        """(factor, ms, what they rest on): the layout's step is predicted x factor + ms. By this model's runs of
        the strategy at the same global batch on other world sizes, the factor: their median measured / predicted.
        Else by its other runs (other models, other batches), the ms: their median measured - predicted, per
        block and per core of the rank, times this layout's blocks over its rank's cores. A ratio does not carry
        to another shape: the strategy's own work (DTensor's dispatch per operator, FSDP's copies per layer)
        follows the layers, not their FLOPs (measured, 2-layer GPT and tiny Llama under FSDP x TP on 4 ranks:
        their ratios 1.86 and 2.66 carried to each other missed by +43 and -30 %, their differences by +3 and
        -3 %). (1, 0, "") where there are none, or `plan.calibrate=false`."""
        name = cfg["strategy"]["name"]
        if not self.plan["calibrate"] or name == "single":  # strategy=single's runs are the throughput itself
            return 1.0, 0.0, ""
        runs = self.predicted_runs(cfg, strategy_runs(self.base["results_dir"], cfg, self.device_name))
        if runs:
            factor = statistics.median(row["step_time_ms_p50"] / time for time, row in runs)
            return factor, 0.0, f"x{factor:.2f}: {name}'s measured / predicted, {described(runs, cfg['global_batch'])}"
        runs = self.predicted_runs(cfg, strategy_runs(self.base["results_dir"], cfg, self.device_name, False),
                                   measured_only=True)
        if runs:
            from bench.models import count_blocks

            per_block_core = statistics.median((row["step_time_ms_p50"] - time) * core_share(row["config"])
                                               / count_blocks(row["config"]["model"]) for time, row in runs)
            ms = per_block_core * count_blocks(cfg["model"]) / core_share(cfg)
            return 1.0, ms, (f"{ms:+.1f} ms: {name}'s measured - predicted per block and core of "
                             f"{described(runs, cfg['global_batch'])}")
        return 1.0, 0.0, ""

    def predicted_runs(self, cfg: dict, runs: list[dict], measured_only: bool = False) -> list[tuple[float, dict]]:
        """(predicted step ms, the row) of each run that can be predicted; with `measured_only`, of those whose
        model's throughput here was measured too, so that the difference is the strategy's alone (another
        model's run predicted at an assumed throughput carries how far that model is from the assumption)."""
        from bench.plan.memory import predicted_memory_mb

        out = []
        for row in runs:
            measured = {**row["config"], "device": cfg["device"], "backend": cfg["backend"],
                        "results_dir": self.base["results_dir"]}
            time, _, source = self.predict(measured, predicted_memory_mb(measured))
            if time and (source.startswith("measured") or not measured_only):
                out.append((time["step_ms"], row))
        return out


def described(runs: list[tuple[float, dict]], global_batch: int) -> str:
    """Which runs: "gpt at 2, 4 rank(s) (4 run(s))", their global batch where it is not `global_batch`."""
    worlds: dict[str, set] = {}
    for _, row in runs:
        batch = "" if row["global_batch"] == global_batch else f" (global batch {row['global_batch']})"
        worlds.setdefault(row["model"] + batch, set()).add(row["world_size"])
    by = "; ".join(f"{model} at {', '.join(map(str, sorted(w)))} rank(s)" for model, w in worlds.items())
    return f"{by} ({len(runs)} run(s))"


def core_share(cfg: dict) -> float:
    """The cores a rank of this layout computes on (CPU: its threads, or its share of the machine's cores);
    1 on a GPU, whose rank drives it from a core of its own."""
    if cfg["device"] != "cpu":
        return 1.0
    cores = machine_cores()
    return min(rank_threads(cfg) or cores, cores / cfg["launch"]["nproc"])


def strategy_runs(results_dir: str | Path, cfg: dict, device_name: str, same_shape: bool = True) -> list[dict]:
    """The measured runs (`measured_runs`) of this layout's strategy with its accumulation, 2-D-ness and threads,
    other than its own (this model at this world size and global batch): with `same_shape`, this model's at
    the same global batch on other world sizes; else every other one, any model and batch."""
    world = cfg["launch"]["nnodes"] * cfg["launch"]["nproc"]
    runs = [row for row in measured_runs(results_dir, cfg, device_name, match_model=same_shape)
            if not (row["config"].get("model") == cfg["model"] and row.get("world_size") == world
                    and row.get("global_batch") == cfg["global_batch"])]
    if same_shape:
        runs = [row for row in runs if row.get("global_batch") == cfg["global_batch"]]
    return [row for row in runs
            if row.get("step_time_ms_p50") and row["config"].get("strategy") == cfg["strategy"]
            and row["config"].get("grad_accum") == cfg["grad_accum"]
            and (row["config"].get("parallel", {}).get("tp", 1) > 1) == (cfg["parallel"]["tp"] > 1)
            and row["config"].get("launch", {}).get("omp_num_threads") == cfg["launch"]["omp_num_threads"]]
