"""One training rank: `python -m bench.rank.worker <run_dir>`, started by a launcher (`bench.launch`).

Builds the model from the seed, lets the strategy wrap it, runs the train loop and writes everything it
measured to `<run_dir>/ranks/rank<N>.json` *before* tearing the process group down, so the controller has
the results even if teardown misbehaves.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from bench.data import build_data
from bench.models import build_on_meta
from bench.parallel.topology import Topology
from bench.rank import runtime
from bench.rank.peak import measured_peak_tflops
from bench.rank.profile import profile_steps
from bench.rank.tracked_step import tracked_step
from bench.rank.train import train
from bench.run import Run
from bench.runfolder import PARAMS

log = logging.getLogger("bench.rank")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    execve, so a rank forked from a 1 GB controller reported 1 GB before it had allocated anything."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def setup_peak(topo: Topology, baseline_rss_mb: float) -> float:
    """The memory the model took at its peak before the first step (building, sharding, materialising): the
    CUDA allocator's peak on a GPU, else the process's peak RSS above its baseline (torch and the process
    group loaded, no model yet)."""
    if topo.device_type == "cuda":
        return torch.cuda.max_memory_allocated(topo.device) / 2**20
    return peak_rss_mb() - baseline_rss_mb


def matmul_precision(device: str, precision: str) -> str:
    """The matmul precision that decides the peak: the autocast dtype, or for fp32 TF32 tensor cores where
    CUDA allows them."""
    if precision != "fp32":
        return precision
    if device.startswith("cuda") and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def progress_bar(enabled: bool, steps: int, warmup: int):
    """A rich progress bar on rank 0; returns (context manager, per-step callback)."""
    if not enabled:
        return nullcontext(), lambda step: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        refresh_per_second=4,
        transient=True,
    )
    task = bar.add_task("warm-up", total=steps)

    def on_step(step: int) -> None:
        bar.update(task, advance=1, description="warm-up" if step + 1 < warmup else "measuring")

    return bar, on_step


def inject_fault(fault: dict, rank: int, phase: str, step: int | None = None) -> None:
    """Make this rank fail on purpose where `fault.*` says so (off by default)."""
    if fault["rank"] != rank or fault["phase"] != phase or (phase == "train" and fault["step"] != step):
        return
    kind = fault["kind"]
    log.error("injecting fault %r at step %d", kind, step)
    if kind == "raise":
        raise RuntimeError(f"injected fault on rank {rank} at step {step} (fault.kind=raise)")
    if kind == "exit":
        os._exit(3)
    if kind == "hang":
        while True:  # the other ranks block in their next collective; only the controller's timeout ends this
            time.sleep(60)
    if kind == "oom":
        raise torch.OutOfMemoryError(f"injected out-of-memory on rank {rank} at step {step} (fault.kind=oom)")
    raise ValueError(f"fault.kind: expected raise, exit, hang or oom, got {kind!r}")


def measure_peak(cfg, topo: Topology, device_name: str, precision: str) -> float:
    """The device's peak at this precision (`peak_tflops=measure`): measured by the node's local rank 0 unless
    cached, while the node's other ranks wait, so that nothing else runs on the node meanwhile."""
    if topo.local_rank != 0 and dist.is_initialized():
        dist.barrier()
    peak = measured_peak_tflops(cfg["results_dir"], topo.device, device_name, precision, topo.local_rank == 0)
    if topo.local_rank == 0 and dist.is_initialized():
        dist.barrier()
    return peak


def train_rank(run_dir: Path, teardown: bool = True) -> None:
    """One rank's whole run. `teardown=False` leaves the process group for the caller's os._exit."""
    cfg = runtime.start(run_dir)
    topo = Topology.from_env(cfg["device"], cfg["backend"], cfg["parallel"])
    if cfg["verify"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    runtime.setup_logging(run_dir, topo.rank)
    runtime.dump_stacks_on_request(run_dir, topo.rank)
    runtime.record_collectives(cfg["flight_recorder_entries"])
    joined = runtime.init_process_group(topo.device, topo.backend)
    # The model's and the strategy's libraries loaded (transformers: ~90 MB, as the run reads their specs) and the
    # device mesh's process groups made before the baseline is taken, so that setup_peak_mb is what the model took.
    run = Run.of(cfg)
    importlib.import_module("torch._dynamo")  # torch.optim's first optimizer imports it (~15 MB)
    if joined:
        topo.mesh()
    baseline_rss_mb = current_rss_mb()
    if cfg["memory_limit_gb"]:
        runtime.limit_memory(topo.device, cfg["memory_limit_gb"])
    log.info("rank %d/%d on %s (%s), %d threads", topo.rank, topo.world_size, topo.device, topo.backend,
             torch.get_num_threads())

    torch.manual_seed(cfg["seed"])
    # Parameters on the meta device: the strategy places them, then allocates and fills only this rank's own
    # (`bench.models.init`), with the values a single-device build gets from the same seed.
    model = build_on_meta(cfg["model"])
    params = sum(p.numel() for p in model.parameters())

    parallel = run.strategy.apply(model, topo, run)
    setup_peak_mb = setup_peak(topo, baseline_rss_mb)
    log.info("model of %d parameters set up: %.1f MB at the peak before the first step", params, setup_peak_mb)
    if topo.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(topo.device)  # what the timed steps hold is measured from here
    batches = build_data(run, topo)
    bar, on_step = progress_bar(cfg["progress"] and topo.rank == 0, cfg["steps"], cfg["warmup"])

    def step_done(step: int) -> None:
        on_step(step)
        inject_fault(cfg["fault"], topo.rank, "train", step)

    with bar:
        records = train(parallel, batches, cfg["steps"], topo.device, step_done)
    timed_end_unix_s = time.time()  # the profiled steps come after this (tests check the traces start later)
    cuda_memory = runtime.cuda_memory(topo.device)  # the allocator's peaks over the timed steps
    final_parameters = parallel.full_parameters() if cfg["verify"] else None  # collective: every rank calls it
    if final_parameters is not None:
        torch.save(final_parameters, run_dir / PARAMS)
    tracked_memory = tracked_step(parallel, batches)  # after the timed steps and the parity snapshot
    profiled = None
    if cfg["profile"]["enabled"]:
        profiled = profile_steps(parallel, batches, cfg["profile"]["steps"], run_dir, topo.rank, topo.device,
                                 cfg["profile"]["memory"])
    precision = matmul_precision(topo.device, cfg["precision"])
    facts = runtime.environment_facts(topo.device)
    peak = measure_peak(cfg, topo, facts["device_name"], precision) if cfg["peak_tflops"] == "measure" else None

    result = {
        "rank": topo.rank,
        "local_rank": topo.local_rank,
        "world_size": topo.world_size,
        "host": socket.gethostname(),
        "device": topo.device,
        "backend": topo.backend if joined else None,
        **facts,
        "params": params,
        "matmul_precision": precision,
        "measured_peak_tflops": peak,
        "devices": parallel.devices,
        "holds_loss": parallel.holds_loss,
        "strategy_facts": parallel.extra,
        "step_time_s": records.step_time_s,
        "data_wait_s": records.data_wait_s,
        "step_timer": records.timer,
        "loss": records.loss,
        "timed_end_unix_s": timed_end_unix_s,
        "profile": profiled,
        "tracked_memory_mb": tracked_memory,
        "baseline_rss_mb": baseline_rss_mb,
        "setup_peak_mb": setup_peak_mb,
        "peak_rss_mb": peak_rss_mb(),
        **cuda_memory,
    }
    runtime.hand_in(run_dir, topo.rank, topo.world_size, topo.local_world_size, result)
    log.info("results written")
    inject_fault(cfg["fault"], topo.rank, "teardown")
    runtime.finish(teardown)


def main() -> None:
    runtime.rank_main(train_rank, "python -m bench.rank.worker <run_dir>  (the run folder holding config.json)")


if __name__ == "__main__":
    main()
