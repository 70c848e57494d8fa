"""One rank of the collectives benchmark: `python -m bench.comm_worker <run_dir>` (started by `python -m
bench.comm` through any of bench's launchers).

For each collective and message size: `comm.warmup_iters` untimed calls, a barrier, then `comm.iters` calls
timed together between device synchronisations; the time of one call is that total / iters. Every rank
measures; the reported time is the max over ranks (a collective is done when its slowest rank is). Rank 0
writes `<run_dir>/comm.json`; the controller (`bench.comm`) turns it into rows with algbw and busbw.

Each collective's variant is picked once: the single-tensor form (all_gather_single / all_gather_into_tensor,
reduce_scatter_single / reduce_scatter_tensor, all_to_all_single), else the list form; a backend that has
neither is reported as skipped with the backend's message. With `comm.check=true` each collective's result
is checked once against the expected values before timing (a wrong result fails the run).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from bench.topology import default_backend
from bench.worker import cuda_memory, device_name, die_with_parent, setup_logging, write_json_atomic

log = logging.getLogger("bench.comm_worker")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
CPU_DEFAULT_MAX_BYTES = 4 * 2**20
CUDA_DEFAULT_MAX_BYTES = 2**30


def message_sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """Powers of two from min_bytes (rounded up to one) to max_bytes."""
    size = 1 << max(0, (min_bytes - 1).bit_length())
    sizes = []
    while size <= max_bytes:
        sizes.append(size)
        size *= 2
    return sizes


def element_count(collective: str, size_bytes: int, elem_size: int, n: int) -> int:
    """Elements of the message nccl-tests calls `size`: the whole buffer (all_gather: the output,
    reduce_scatter: the input, all_to_all: what each rank sends); split evenly between ranks where needed."""
    count = size_bytes // elem_size
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        count -= count % n
    return count


def _variants(collective: str, n: int) -> list[tuple[str, Callable]]:
    """(name, build(count, dtype, device, rank) -> (call, check)) candidates, preferred first."""

    def all_reduce(count, dtype, device, rank):
        buf = torch.full((count,), float(rank + 1), dtype=dtype, device=device)
        expected = n * (n + 1) / 2

        def call():
            dist.all_reduce(buf)

        def check():
            buf.fill_(rank + 1)
            call()
            return bool(torch.all(buf == expected))

        return call, check

    def gather_single(fn):
        def build(count, dtype, device, rank):
            inp = torch.full((count // n,), float(rank + 1), dtype=dtype, device=device)
            out = torch.empty(count, dtype=dtype, device=device)
            expected = torch.arange(1, n + 1, dtype=dtype, device=device).repeat_interleave(count // n)

            def call():
                fn(out, inp)

            return call, lambda: (call(), bool(torch.equal(out, expected)))[1]

        return build

    def gather_list(count, dtype, device, rank):
        inp = torch.full((count // n,), float(rank + 1), dtype=dtype, device=device)
        outs = list(torch.empty(count, dtype=dtype, device=device).chunk(n))

        def call():
            dist.all_gather(outs, inp)

        return call, lambda: (call(), all(bool(torch.all(o == j + 1)) for j, o in enumerate(outs)))[1]

    def scatter_single(fn):
        def build(count, dtype, device, rank):
            inp = torch.full((count,), float(rank + 1), dtype=dtype, device=device)
            out = torch.empty(count // n, dtype=dtype, device=device)

            def call():
                fn(out, inp)

            return call, lambda: (call(), bool(torch.all(out == n * (n + 1) / 2)))[1]

        return build

    def scatter_list(count, dtype, device, rank):
        inps = list(torch.full((count,), float(rank + 1), dtype=dtype, device=device).chunk(n))
        out = torch.empty(count // n, dtype=dtype, device=device)

        def call():
            dist.reduce_scatter(out, inps)

        return call, lambda: (call(), bool(torch.all(out == n * (n + 1) / 2)))[1]

    def broadcast(count, dtype, device, rank):
        buf = torch.full((count,), float(rank + 1), dtype=dtype, device=device)

        def call():
            dist.broadcast(buf, src=0)

        def check():
            buf.fill_(rank + 1)
            call()
            return bool(torch.all(buf == 1))

        return call, check

    def a2a_values(count, dtype, device, rank):
        # chunk j of rank r holds 8r + j (exact in every dtype for small worlds); after the exchange chunk j of
        # rank r holds what rank j sent it: 8j + r
        chunk = count // n
        inp = torch.cat([torch.full((chunk,), float(8 * rank + j), dtype=dtype, device=device) for j in range(n)])
        expected = torch.cat([torch.full((chunk,), float(8 * j + rank), dtype=dtype, device=device) for j in range(n)])
        return inp, expected

    def a2a_single(count, dtype, device, rank):
        inp, expected = a2a_values(count, dtype, device, rank)
        out = torch.empty(count, dtype=dtype, device=device)

        def call():
            dist.all_to_all_single(out, inp)

        return call, lambda: (call(), bool(torch.equal(out, expected)))[1]

    def a2a_list(count, dtype, device, rank):
        inp, expected = a2a_values(count, dtype, device, rank)
        out = torch.empty(count, dtype=dtype, device=device)
        outs, inps = list(out.chunk(n)), list(inp.chunk(n))

        def call():
            dist.all_to_all(outs, inps)

        return call, lambda: (call(), bool(torch.equal(out, expected)))[1]

    gather_fn = getattr(dist, "all_gather_single", None)  # torch >= 2.13; all_gather_into_tensor before
    scatter_fn = getattr(dist, "reduce_scatter_single", None)
    table = {
        "all_reduce": [("all_reduce", all_reduce)],
        "all_gather": [
            ("all_gather_single", gather_single(gather_fn)) if gather_fn else None,
            ("all_gather_into_tensor", gather_single(dist.all_gather_into_tensor)) if not gather_fn else None,
            ("all_gather", gather_list),
        ],
        "reduce_scatter": [
            ("reduce_scatter_single", scatter_single(scatter_fn)) if scatter_fn else None,
            ("reduce_scatter_tensor", scatter_single(dist.reduce_scatter_tensor)) if not scatter_fn else None,
            ("reduce_scatter", scatter_list),
        ],
        "broadcast": [("broadcast", broadcast)],
        "all_to_all": [("all_to_all_single", a2a_single), ("all_to_all", a2a_list)],
    }
    return [v for v in table[collective] if v is not None]


def _pick_variant(collective: str, n: int, dtype, device: str, rank: int, check: bool):
    """The first variant the backend runs (tried on a small message), or (None, why none did)."""
    problems = []
    for name, build in _variants(collective, n):
        call, verify = build(n * 4, dtype, device, rank)
        try:
            ok = verify() if check else (call(), True)[1]
        except (RuntimeError, NotImplementedError, ValueError) as exc:  # the backend does not implement it
            problems.append(f"{name}: {' '.join(str(exc).split())[:300]}")
            continue
        if not ok:
            raise RuntimeError(f"{collective} ({name}) returned wrong values on rank {rank}: the setup is broken")
        return name, build
    return None, "; ".join(problems)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def memory_cap(device: str, local_world_size: int) -> int | None:
    """Largest message that leaves room: about three buffers of it per rank (all_to_all holds two)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        with open("/proc/meminfo") as f:
            available_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None
    return available_kb * 1024 // (4 * local_world_size)


def run(run_dir: Path) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    cfg = json.loads((run_dir / "config.json").read_text())
    comm = cfg["comm"]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    setup_logging(run_dir, rank)
    device = f"cuda:{local_rank}" if cfg["device"] == "cuda" else "cpu"
    backend = default_backend(cfg["device"]) if cfg["backend"] == "auto" else cfg["backend"]
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=torch.device(device) if device.startswith("cuda") else None)
    dtype = DTYPES[comm["dtype"]]
    elem = torch.tensor([], dtype=dtype).element_size()

    max_bytes = comm["max_bytes"] or (CUDA_DEFAULT_MAX_BYTES if device.startswith("cuda") else CPU_DEFAULT_MAX_BYTES)
    cap = memory_cap(device, local_world)
    warnings = []
    if cap is not None:
        # every rank must run the same sizes: agree on the smallest cap
        agreed = torch.tensor([cap], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if agreed.item() < max_bytes:
            warnings.append(f"sizes capped at {agreed.item()} bytes by free memory (comm.max_bytes={max_bytes})")
            max_bytes = int(agreed.item())
    sizes = message_sizes(comm["min_bytes"], max_bytes)
    log.info("rank %d/%d on %s (%s): %s over %d sizes", rank, world, device, backend, comm["collectives"], len(sizes))

    measurements, skipped = [], {}
    for collective in comm["collectives"]:
        variant, build = _pick_variant(collective, world, dtype, device, rank, comm["check"])
        if variant is None:
            skipped[collective] = f"backend {backend} runs none of its variants: {build}"
            log.warning("%s skipped: %s", collective, skipped[collective])
            continue
        for size in sizes:
            count = element_count(collective, size, elem, world)
            if count == 0:
                continue
            call, _ = build(count, dtype, device, rank)
            for _ in range(comm["warmup_iters"]):
                call()
            _sync(device)
            dist.barrier()
            _sync(device)
            start = time.perf_counter()
            for _ in range(comm["iters"]):
                call()
            _sync(device)
            seconds = (time.perf_counter() - start) / comm["iters"]
            measurements.append(
                {"collective": collective, "variant": variant, "size_bytes": count * elem, "count": count, "s": seconds}
            )
            del call
        log.info("%s done (%s)", collective, variant)

    # max and min over ranks of every measured time, in one collective each
    times = torch.tensor([m["s"] for m in measurements], dtype=torch.float64, device=device)
    slowest, fastest = times.clone(), times.clone()
    if len(measurements):
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
            "device_name": device_name(device),
            "dtype": comm["dtype"],
            "warmup_iters": comm["warmup_iters"],
            "iters": comm["iters"],
            "checked": comm["check"],
            "measurements": measurements,
            "skipped": skipped,
            "warnings": warnings,
            "num_threads": torch.get_num_threads(),
            **cuda_memory(device),
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
            "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if device.startswith("cuda") else None,
        }
        write_json_atomic(run_dir / "comm.json", result)
        log.info("results written")
    dist.destroy_process_group()


@record
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m bench.comm_worker <run_dir>  (the run folder holding config.json)")
    try:
        run(Path(argv[0]))
    except Exception:
        log.exception("rank failed")
        raise


if __name__ == "__main__":
    main()
