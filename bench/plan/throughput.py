"""What one rank computes per second in a layout: measured here (the model's `strategy=single` runs under
`results_dir`), given (`plan.device_tflops`) or assumed (the device's peak x `plan.mfu_pct`); and the measured
runs the plan reads (`results_files`), found by `bench.configs.same_configuration`."""

from __future__ import annotations

import math
import os
import shlex
import statistics
from collections.abc import Iterable
from pathlib import Path

from bench.configs import LENGTH_KEYS, same_configuration
from bench.launch.agent import threads_per_rank
from bench.plan.rows import planner_row_problem, planner_rows, warn_once

# What may differ between a layout and the runs that say how fast its model computes: where and how wide it ran,
# how long, which strategy (a `strategy=single` run is the measure), and the accumulation of its batch.
THROUGHPUT_VARIES = ("launch.", "parallel.", "strategy.", "global_batch", "grad_accum", *LENGTH_KEYS)
# The plan's overrides that the strategy=single run measuring its model leaves out: the planner's own, those the
# throughput's lookup ignores (bar global_batch: the user's batch is the one to measure) and those each layout
# sets itself. `model=` too: the run names the option the plan composed.
NOT_IN_THE_SINGLE_RUN = ("plan", "search", "launch", "parallel", "strategy", "grad_accum", "activation_checkpointing",
                         *LENGTH_KEYS)


def results_files(results_dir: str | Path) -> list[Path]:
    """The runs.jsonl files `python -m bench` appends to under `results_dir`: its own (single runs), then each
    sweep's (`-m`: hydra.sweep.dir, `<results_dir>/sweeps/<sweep>/`, conf/config.yaml)."""
    root = Path(results_dir)
    return [root / "runs.jsonl", *sorted(root.glob("sweeps/*/runs.jsonl"))]


def measured_runs(results_dir: str | Path, cfg, device_name: str, ignoring: tuple[str, ...]) -> list[dict]:
    """The `ok` rows under `results_dir` (`results_files`) on this device of the same configuration as `cfg`,
    the keys `ignoring` aside: what predictions are calibrated by and checked against. Rows the planner cannot
    read are skipped, each with one warning (`planner_rows`)."""
    return [row for path in results_files(results_dir) for row in planner_rows(path, planner_row_problem)
            if row.get("status") == "ok" and row.get("device_name") == device_name
            and same_configuration(row["config"], cfg, ignoring)]


def single_run_overrides(overrides: Iterable[str], model_choice: str) -> tuple[str, ...]:
    """What `python -m bench strategy=single` needs of a plan's `overrides` to measure the plan's model as the
    plan looks it up: `model=<model_choice>` and every override but those of `NOT_IN_THE_SINGLE_RUN`."""
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "model" or any(key == k or key.startswith(f"{k}.") for k in NOT_IN_THE_SINGLE_RUN):
            continue
        kept.append(override)
    return (f"model={model_choice}", *kept)


def measured_throughput(results_dir: str | Path, run, device_name: str) -> dict | None:
    """The hardware TFLOP/s this model reached in `strategy=single` runs on this device, at the measured global
    batch nearest (by ratio) the layout's per-device batch (CPU: the machine's, from a run on all its cores): the
    median over the repeats there, and its threads."""
    runs = [row for row in measured_runs(results_dir, run.config, device_name, THROUGHPUT_VARIES)
            if row["config"]["strategy"]["name"] == "single" and row.get("step_time_ms_p50")
            and row.get("hardware_flops_per_step")]
    for row in runs:
        if row.get("global_batch") is None:  # the batch it measured is what picks the run: without it, unusable
            warn_once(f"{row['_where']}: not used for the throughput, the row has no global_batch")
    runs = [row for row in runs if row.get("global_batch") is not None]
    if not runs:
        return None
    target = run.config["global_batch"] / run.world_size  # a device's share of the step
    if run.device == "cpu":
        # ranks on one machine share its cores: the machine's own throughput, from a run that used them all, on
        # the machine's share of the step (measured here: 2 concurrent 1-thread ranks run slower than one
        # 1-thread process alone, which predicted DDP's step 20% short)
        if any(r.get("omp_num_threads") == machine_cores() for r in runs):
            runs = [r for r in runs if r.get("omp_num_threads") == machine_cores()]
        target = run.config["global_batch"] / run.world_size * run.nproc
    batch = min({r["global_batch"] for r in runs}, key=lambda b: (abs(math.log(b / target)), -b))  # by ratio
    chosen = [r for r in runs if r["global_batch"] == batch]
    return {"tflops": statistics.median(r["hardware_flops_per_step"] / r["step_time_ms_p50"] / 1e9 for r in chosen),
            "threads": chosen[0].get("omp_num_threads"), "global_batch": batch, "runs": len(chosen)}


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def rank_threads(cfg) -> int | None:
    """The threads a CPU rank of this layout gets (None: torch's default, or not a CPU)."""
    if cfg["device"] != "cpu":
        return None
    return threads_per_rank(cfg["launch"]["nproc"], cfg["launch"]["omp_num_threads"])


def core_share(cfg) -> float:
    """The cores a rank of this layout computes on (CPU: its threads, or its share of the machine's cores);
    1 on a GPU, whose rank drives it from a core of its own."""
    if cfg["device"] != "cpu":
        return 1.0
    cores = machine_cores()
    return min(rank_threads(cfg) or cores, cores / cfg["launch"]["nproc"])


def rank_tflops(run, plan: dict, measured: dict | None, peak_tflops: float | None,
                single_run: tuple[str, ...] = ()) -> tuple[float | None, str]:
    """One rank's throughput in the layout `run`, and where it comes from; where none is known, the command that
    measures it (`single_run`: `single_run_overrides`)."""
    if plan["device_tflops"]:
        return float(plan["device_tflops"]), f"plan.device_tflops={plan['device_tflops']}"
    if measured:
        tflops, source = measured["tflops"], (f"measured: strategy=single, global_batch={measured['global_batch']}"
                                              f" ({measured['runs']} run(s))")
        if run.device == "cpu" and measured["threads"]:
            # a rank's share of the machine: its threads, or its share of the cores when ranks x threads exceed
            # them (linear in threads: a run on all the machine's cores measures the machine best)
            share = core_share(run.config)
            if share != measured["threads"]:
                tflops *= share / measured["threads"]
                source += f", {share:g} of the {measured['threads']} thread(s) it ran on per rank"
        return tflops, source
    if peak_tflops:
        return peak_tflops * plan["mfu_pct"] / 100, f"assumed: {plan['mfu_pct']}% of a {peak_tflops:g} TFLOP/s peak"
    # the lookup matches activation checkpointing: a layout with it needs a run with it
    checkpointing = ("activation_checkpointing=true",) if run.config["activation_checkpointing"] else ()
    command = shlex.join(("python", "-m", "bench", "strategy=single", *single_run, *checkpointing))
    which = " with activation_checkpointing=true" if checkpointing else ""
    return None, (f"no throughput: no strategy=single run of this model{which} measured here: run `{command}` once, "
                  "or set plan.device_tflops")
