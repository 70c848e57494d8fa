"""One rank: `python -m bench.worker <run_dir>`, started by the controller through torchrun's machinery.

Reads the resolved config the controller wrote and torchrun's env:// variables; never imports Hydra.
It writes everything it measured to `<run_dir>/ranks/rank<N>.json` *before* tearing the process group
down, so the controller has the results even if teardown misbehaves.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import resource
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from bench.data import build_data
from bench.flops import train_flops_per_sample
from bench.memory import held_mb
from bench.models import build_model, model_module
from bench.strategies import apply_strategy
from bench.topology import Topology
from bench.train import device_sync, train

log = logging.getLogger("bench.worker")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup_logging(run_dir: Path, rank: int) -> None:
    log_file = run_dir / "logs" / f"rank{rank}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if rank != 0:
        # Everything this rank prints, C++ and NCCL messages included, goes to its log; rank 0 keeps the
        # terminal for the progress bar and copies its log lines into its file.
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        handlers = [logging.StreamHandler(sys.stderr)]
    else:
        terminal = logging.StreamHandler(sys.stderr)
        terminal.setLevel(logging.WARNING)  # the terminal shows the progress bar and the summary, not chatter
        handlers = [terminal, logging.FileHandler(log_file)]
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", handlers=handlers
    )


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return _cpu_model_name() or platform.processor() or platform.machine()


def _cpu_model_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def matmul_precision(device: str, precision: str) -> str:
    """The matmul precision that decides the peak: the autocast dtype, or for fp32 TF32 tensor cores where
    CUDA allows them."""
    if precision != "fp32":
        return precision
    if device.startswith("cuda") and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def cuda_memory(device: str) -> dict:
    if not device.startswith("cuda"):
        return {}  # the CPU build reports 0 for CUDA memory: never record a CUDA figure off a GPU
    stats = torch.cuda.memory_stats(device)
    return {
        "cuda_peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
        "cuda_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        "cuda_alloc_retries": stats.get("num_alloc_retries", 0),
        "cuda_ooms": stats.get("num_ooms", 0),
    }


def progress_bar(enabled: bool, steps: int, warmup: int):
    """A rich progress bar on rank 0; returns (context manager, per-step callback)."""
    from contextlib import nullcontext

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


def die_with_parent() -> None:
    """Ask Linux to kill this rank if its launcher dies, so no rank outlives its run as an orphan."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the request was in place
        os._exit(1)


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def hand_in(run_dir: Path, topo: Topology, result: dict) -> None:
    """Write this rank's results to `<run_dir>/ranks/rank<N>.json` for the controller.

    When the ranks span several nodes (or the launcher asks for it: launch=inline, where rank 0's own
    controller records the row), rank 0 gathers every rank's results through the process group and writes
    them all, so they land where the row is written even without a shared filesystem.
    """
    gather = os.environ.get("BENCH_GATHER_RESULTS") == "1" or topo.local_world_size != topo.world_size
    if not (gather and dist.is_initialized()):
        write_json_atomic(run_dir / "ranks" / f"rank{topo.rank}.json", result)
        return
    gathered = [None] * topo.world_size if topo.rank == 0 else None
    dist.gather_object(result, gathered, dst=0)
    for one in gathered or []:
        write_json_atomic(run_dir / "ranks" / f"rank{one['rank']}.json", one)


def run(run_dir: Path, teardown: bool = True) -> None:
    """One rank's whole run. `teardown=False` leaves the process group for the caller's os._exit."""
    die_with_parent()
    # torch's agent forwards the signal that stopped it (SIGINT on Ctrl-C) to the ranks: let it end a rank at
    # once, even inside a C++ collective, rather than as a KeyboardInterrupt the rank may never get to raise.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    cfg = json.loads((run_dir / "config.json").read_text())
    topo = Topology.from_env(cfg["device"], cfg["backend"], cfg["parallel"])
    if cfg["verify"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    setup_logging(run_dir, topo.rank)
    if topo.device.startswith("cuda"):
        torch.cuda.set_device(topo.device)
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ
    if launched_by_torchrun:
        device_id = torch.device(topo.device) if topo.device.startswith("cuda") else None
        dist.init_process_group(topo.backend, device_id=device_id)
    baseline_rss_mb = current_rss_mb()
    log.info(
        "rank %d/%d on %s (%s), %d threads",
        topo.rank,
        topo.world_size,
        topo.device,
        topo.backend,
        torch.get_num_threads(),
    )

    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"])  # built on the CPU from one seed: identical weights everywhere
    params = sum(p.numel() for p in model.parameters())
    probe = model_module(cfg["model"]).synthetic_batch(cfg["model"], 1, torch.Generator().manual_seed(0))
    flops_per_sample = train_flops_per_sample(model.to(topo.device), *(t.to(topo.device) for t in probe))

    parallel = apply_strategy(model, topo, cfg)
    if topo.device_type == "cuda":
        # The whole model sat on this device for the FLOP count and until the strategy sharded or split
        # it: what the run holds is measured from here.
        torch.cuda.reset_peak_memory_stats(topo.device)
    batches = build_data(cfg, topo)
    bar, on_step = progress_bar(cfg["progress"] and topo.rank == 0, cfg["steps"], cfg["warmup"])

    def step_done(step: int) -> None:
        on_step(step)
        inject_fault(cfg["fault"], topo.rank, "train", step)

    with bar:
        records = train(parallel, batches, cfg["steps"], device_sync(topo.device), step_done)
    held = held_mb(parallel)
    final_parameters = parallel.full_parameters() if cfg["verify"] else None  # collective: every rank calls it
    if final_parameters is not None:
        torch.save(final_parameters, run_dir / "params.pt")

    result = {
        "rank": topo.rank,
        "local_rank": topo.local_rank,
        "world_size": topo.world_size,
        "host": socket.gethostname(),
        "device": topo.device,
        "device_name": device_name(topo.device),
        "backend": topo.backend if launched_by_torchrun else None,
        "num_threads": torch.get_num_threads(),
        "params": params,
        "flops_per_sample": flops_per_sample,
        "matmul_precision": matmul_precision(topo.device, cfg["precision"]),
        "devices": parallel.devices,
        "holds_loss": parallel.holds_loss,
        **held,
        "strategy_facts": parallel.extra,
        "step_time_s": records.step_time_s,
        "data_wait_s": records.data_wait_s,
        "loss": records.loss,
        "baseline_rss_mb": baseline_rss_mb,
        "peak_rss_mb": peak_rss_mb(),
        **cuda_memory(topo.device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if topo.device.startswith("cuda") else None,
    }
    hand_in(run_dir, topo, result)
    log.info("results written")
    inject_fault(cfg["fault"], topo.rank, "teardown")
    if dist.is_initialized():
        dist.barrier()  # every rank has handed in its results: nobody leaves while a peer still needs it
        if teardown:
            dist.destroy_process_group()


@record
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m bench.worker <run_dir>  (the run folder holding config.json)")
    try:
        run(Path(argv[0]), teardown=False)
    except Exception:
        log.exception("rank failed")
        raise
    exit_without_teardown()


def exit_without_teardown() -> None:
    """Leave at once, results handed in: skip destructors and interpreter shutdown. Gloo's teardown has been
    seen to deadlock (the main thread destroying the process group while holding the GIL, gloo's worker
    thread freeing its last work item and waiting for the GIL) and to abort ("terminate called without an
    active exception") after all work was done; neither barrier nor destroy_process_group cures that."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
