"""What every rank process does, whatever it measures: the training rank (`bench.rank.worker`) and the
collectives rank (`bench.comm.worker`) both start, log, report where they ran, hand in their results and leave
through here.

A rank never imports Hydra: it reads the resolved config the controller wrote into its run folder and
torchrun's env:// variables.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import logging
import os
import platform
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from bench.launch.watch import pid_record
from bench.results import write_bytes_atomic
from bench.runfolder import (
    COLLECTIVES,
    GATHER_ENV,
    LOGS,
    PIDS,
    STACKS,
    rank_file,
    read_config,
    write_rank_result,
)

log = logging.getLogger("bench.rank")


def start(run_dir: Path) -> dict:
    """The first thing a rank does: tie its life to its launcher's, let a forwarded Ctrl-C end it, read its
    config."""
    die_with_parent()
    # torch's agent forwards the signal that stopped it (SIGINT on Ctrl-C) to the ranks: let it end a rank at
    # once, even inside a C++ collective, rather than as a KeyboardInterrupt the rank may never get to raise.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return read_config(run_dir)


def die_with_parent() -> None:
    """Ask Linux to kill this rank if its launcher dies, so no rank outlives its run as an orphan."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the request was in place
        os._exit(1)


def setup_logging(run_dir: Path, rank: int) -> None:
    log_file = rank_file(run_dir, LOGS, rank, ".log")
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


def dump_stacks_on_request(run_dir: Path, rank: int) -> None:
    """On SIGUSR1, write every thread's Python stack to `<run_dir>/stacks/rank<N>.txt` (faulthandler: it works
    even inside a C++ collective holding the GIL) and the flight recorder's record of this rank's collectives
    (see `record_collectives`) to `<run_dir>/collectives/rank<N>` (a pickle, which torch's analyser reads:
    `python -m torch.distributed.flight_recorder.fr_trace <run_dir>/collectives --prefix rank`, and which is
    all that folder may hold) and `<run_dir>/stacks/rank<N>_collectives.json` (what the controller reads); and
    leave this rank's pid and start time in `<run_dir>/pids/rank<N>` (`bench.launch.watch.pid_record`), so that a
    controller whose deadline passed can learn where each rank hung before stopping it, and signals no other
    process that has this pid by then.

    Python runs a signal handler only between bytecodes of the main thread, which a hung collective never
    reaches; its C-level handler does write the signal's number to the wakeup fd at once, so a thread waiting on
    that fd makes the collectives dump (it needs the GIL, which a rank waiting in a collective, or sleeping, has
    released). faulthandler's handler goes in front of Python's and chains to it: one signal, both dumps."""
    for folder in (STACKS, PIDS, COLLECTIVES):
        (run_dir / folder).mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGUSR1, lambda *_: None)
    signal.set_wakeup_fd(write_fd)
    stack_file = open(rank_file(run_dir, STACKS, rank, ".txt"), "w")  # kept open: faulthandler writes to its fd
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True, chain=True)
    threading.Thread(target=_dump_collectives_when_asked, args=(read_fd, run_dir, rank),
                     daemon=True, name="bench-collectives-dump").start()
    rank_file(run_dir, PIDS, rank).write_text(pid_record())


def _dump_collectives_when_asked(read_fd: int, run_dir: Path, rank: int) -> None:
    while os.read(read_fd, 1) != bytes([signal.SIGUSR1]):
        pass
    from torch._C import _distributed_c10d as c10d

    dumps = {rank_file(run_dir, COLLECTIVES, rank): getattr(c10d, "_dump_fr_trace", None),
             rank_file(run_dir, STACKS, rank, "_collectives.json"): getattr(c10d, "_dump_fr_trace_json", None)}
    for path, dump in dumps.items():  # both dumps since torch 2.8
        try:
            content = dump() if dump else b'{"error": "this torch has no flight recorder dump"}'
        except Exception as exc:  # e.g. no process group yet: say why, so the controller stops waiting
            content = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
        write_bytes_atomic(path, content)


def record_collectives(entries: int) -> None:
    """Keep torch's flight recorder of this rank's last `entries` collectives (gloo and NCCL alike; read when the
    process group is made), unless the user set it. Off by default: on the H200 here it cost up to 8 us per 4
    KiB NCCL all-reduce (median 28.7 against 20.5 us, 3 interleaved runs of 5 x 5,000 calls; no difference
    within the noise on gloo), and a benchmark's ranks run as the user's own torchrun would."""
    from torch._C import _distributed_c10d as c10d

    names = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")  # torch >= 2.8 (gloo too), and before it
    if entries > 0 and not any(name in os.environ for name in names):
        os.environ[names[0] if hasattr(c10d, "_dump_fr_trace") else names[1]] = str(entries)


def limit_memory(device: str, limit_gb: float) -> None:
    """Let this rank allocate `limit_gb` more than it holds now, as a device that size would: on CUDA through
    the caching allocator's fraction of the GPU, on CPU through RLIMIT_DATA above the process's data segment
    (torch's CPU allocator then fails with "can't allocate memory", an `oom` row). A limit, so it costs no
    speed."""
    import resource

    limit = int(limit_gb * 2**30)
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated(device) + limit) / total),
                                                   device)
        return
    fixed_mmap_threshold()
    with open("/proc/self/status") as f:
        data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    resource.setrlimit(resource.RLIMIT_DATA, (data + limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def fixed_mmap_threshold(size: int = 128 * 1024) -> None:
    """Tensors of `size` bytes and more in their own mappings, given back to the system when freed. glibc raises
    its threshold to the largest block freed (up to 32 MB): the next step's tensors below it then come from a
    heap that keeps what it frees, and a rank's memory grows past the tensors it holds. Measured here (GPT of 4
    layers, 8,192 tokens, cp 2): 1,449 MB above start-up for 842 MB of tensors; fixed, 868 MB. Without it
    `memory_limit_gb` limited the heap's waste, not the tensors. The mappings cost page faults: a step took 15.6
    and 16.1 s at 4 layers, 26.7 and 31.1 s at 8 (without, with; one run each), so only a limited run has it.
    No-op off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, size)


def init_process_group(device: str, backend: str) -> bool:
    """Join the process group when a launcher started this rank (torchrun's variables are set); a plain
    process is a world of one and joins nothing. Returns whether it joined."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "RANK" not in os.environ:
        return False
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=torch.device(device) if device.startswith("cuda") else None)
    return True


# --------------------------------------------------------------------------- where the rank ran


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


def environment_facts(device: str) -> dict:
    """Where this rank ran: the device, its thread count and the software versions, for the row."""
    return {
        "device_name": device_name(device),
        "num_threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if device.startswith("cuda") else None,
    }


# --------------------------------------------------------------------------- handing in and leaving


def hand_in(run_dir: Path, rank: int, world_size: int, local_world_size: int, result: dict) -> None:
    """Write this rank's results to `<run_dir>/ranks/rank<N>.json` for the controller.

    When the ranks span several nodes (or the launcher asks for it: launch=inline, where rank 0's own
    controller records the row), rank 0 gathers every rank's results through the process group and writes
    them all, so they land where the row is written even without a shared filesystem.
    """
    gather = os.environ.get(GATHER_ENV) == "1" or local_world_size != world_size
    if not (gather and dist.is_initialized()):
        write_rank_result(run_dir, rank, result)
        return
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object({**result, "rank": rank}, gathered, dst=0)
    for one in gathered or []:
        write_rank_result(run_dir, one["rank"], one)


def finish(teardown: bool) -> None:
    """After the results are handed in: wait until every rank has handed in its own (nobody leaves while a
    peer still needs it), then leave the process group unless the caller leaves with `exit_without_teardown`."""
    if dist.is_initialized():
        dist.barrier()
        if teardown:
            dist.destroy_process_group()


def exit_without_teardown() -> None:
    """Leave at once, results handed in: skip destructors and interpreter shutdown. Gloo's teardown has been
    seen to deadlock (the main thread destroying the process group while holding the GIL, gloo's worker
    thread freeing its last work item and waiting for the GIL) and to abort ("terminate called without an
    active exception") after all work was done; neither barrier nor destroy_process_group cures that."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_main(run_rank: Callable[..., None], usage: str, argv: list[str] | None = None) -> None:
    """`python -m <worker> <run_dir>`: run one rank, record its exception for torchrun (its @record error file
    names the failed rank's error in the controller's row), then leave without interpreter teardown."""
    from torch.distributed.elastic.multiprocessing.errors import record

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(f"usage: {usage}")

    @record
    def main() -> None:
        try:
            run_rank(Path(argv[0]), teardown=False)
        except Exception:
            log.exception("rank failed")
            raise

    main()
    exit_without_teardown()
