"""One rank of the collectives benchmark: `python -m bench.comm.worker <run_dir>`, started by `python -m
bench.comm` through any of bench's launchers.

For each collective and message size: `comm.warmup_iters` untimed calls, a barrier, then `comm.iters` calls
timed together between device synchronisations (nccl-tests' method); the time of one call is that total /
iters. Every rank measures; the reported time is the max over ranks (a collective is done when its slowest
rank is). Rank 0 writes `<run_dir>/comm.json`; the controller turns it into rows with algbw and busbw.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.comm.collectives import MESSAGE_DTYPES, buffers, element_count, message_sizes, pick_variant
from bench.parallel.topology import default_backend
from bench.rank import runtime
from bench.results import write_json_atomic
from bench.runfolder import COMM, stamped

log = logging.getLogger("bench.comm")

CPU_DEFAULT_MAX_BYTES = 4 * 2**20
CUDA_DEFAULT_MAX_BYTES = 2**30


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def memory_cap(device: str, local_world_size: int) -> int | None:
    """Largest message that leaves room: about three buffers of it per rank (input, output, expected)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        with open("/proc/meminfo") as f:
            available_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None
    return available_kb * 1024 // (4 * local_world_size)


def agreed_max_bytes(comm: dict, device: str, local_world: int, warnings: list[str]) -> int:
    """`comm.max_bytes` (or the device's default), lowered where free memory is short. Every rank must run the
    same sizes: they agree on the smallest cap."""
    max_bytes = comm["max_bytes"] or (CUDA_DEFAULT_MAX_BYTES if device.startswith("cuda") else CPU_DEFAULT_MAX_BYTES)
    cap = memory_cap(device, local_world)
    if cap is None:
        return max_bytes
    agreed = torch.tensor([cap], dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if agreed.item() < max_bytes:
        warnings.append(f"sizes capped at {agreed.item()} bytes by free memory (comm.max_bytes={max_bytes})")
        return int(agreed.item())
    return max_bytes


def time_call(call, comm: dict, device: str) -> float:
    """Seconds per call of `call` on this rank."""
    for _ in range(comm["warmup_iters"]):
        call()
    sync(device)
    dist.barrier()
    sync(device)
    start = time.perf_counter()
    for _ in range(comm["iters"]):
        call()
    sync(device)
    return (time.perf_counter() - start) / comm["iters"]


def measure_collectives(run_dir: Path, teardown: bool = True) -> None:
    cfg = runtime.start(run_dir)
    comm = cfg["comm"]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    runtime.setup_logging(run_dir, rank)
    runtime.dump_stacks_on_request(run_dir, rank)
    device = f"cuda:{local_rank}" if cfg["device"] == "cuda" else "cpu"
    backend = default_backend(cfg["device"]) if cfg["backend"] == "auto" else cfg["backend"]
    runtime.init_process_group(device, backend)
    dtype = MESSAGE_DTYPES[comm["dtype"]]
    elem = torch.tensor([], dtype=dtype).element_size()
    warnings: list[str] = []
    sizes = message_sizes(comm["min_bytes"], agreed_max_bytes(comm, device, local_world, warnings))
    log.info("rank %d/%d on %s (%s): %s over %d sizes", rank, world, device, backend, comm["collectives"], len(sizes))

    measurements, skipped = [], {}
    for collective in comm["collectives"]:
        variant, bind = pick_variant(collective, world, rank, dtype, device, comm["check"])
        if variant is None:
            skipped[collective] = f"backend {backend} runs none of its variants: {bind}"
            log.warning("%s skipped: %s", collective, skipped[collective])
            continue
        for size in sizes:
            count = element_count(collective, size, elem, world)
            if count == 0:
                continue
            call = bind(buffers(collective, count, world, rank, dtype, device), world)
            seconds = time_call(call, comm, device)
            measurements.append({"collective": collective, "variant": variant, "size_bytes": count * elem,
                                 "count": count, "s": seconds})
            del call
        log.info("%s done (%s)", collective, variant)

    # max and min over ranks of every measured time, in one collective each
    times = torch.tensor([m["s"] for m in measurements], dtype=torch.float64, device=device)
    slowest, fastest = times.clone(), times.clone()
    if measurements:
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(fastest, op=dist.ReduceOp.MIN)
    for m, hi, lo in zip(measurements, slowest.tolist(), fastest.tolist(), strict=True):
        m["time_s_max_rank"], m["time_s_min_rank"] = hi, lo
        del m["s"]
    if rank == 0:
        result = {
            "world_size": world,
            "local_world_size": local_world,
            "backend": backend,
            "device": device,
            **runtime.environment_facts(device),
            "dtype": comm["dtype"],
            "warmup_iters": comm["warmup_iters"],
            "iters": comm["iters"],
            "checked": comm["check"],
            "measurements": measurements,
            "skipped": skipped,
            "warnings": warnings,
            **runtime.cuda_memory(device),
        }
        write_json_atomic(run_dir / COMM, stamped(result))
        log.info("results written")
    runtime.finish(teardown)


def main() -> None:
    runtime.rank_main(measure_collectives, "python -m bench.comm.worker <run_dir>  (the folder with config.json)")


if __name__ == "__main__":
    main()
