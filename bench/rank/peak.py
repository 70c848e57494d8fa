"""`peak_tflops=measure`: the MFU denominator measured on the run's own device, at the run's precision.

Large square matrix products (the densest work a device does) timed best of several, in this rank's process
with its threads: on a CPU that is what the rank trains with, on a GPU the whole device. The result is cached
per host, device, precision and thread count under `<results_dir>/.cache/peak/`, so a device is measured
once, and only by local rank 0 while the node's other ranks wait: every rank of the node uses that figure.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_SIZE, CUDA_SIZE = 1024, 8192
REPEATS = 5


@contextmanager
def tf32_matmuls(enabled: bool):
    """cuBLAS may use TF32 for fp32 products inside, as before outside (torch has no context manager for it:
    `torch.backends.cuda.matmul.flags` does not exist, as the H200 run showed)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def matmul_tflops(device: str, precision: str, size: int | None = None, repeats: int = REPEATS) -> float:
    """The best of `repeats` timings of one size x size x size matrix product (2·size³ FLOPs), after two untimed."""
    size = size or (CUDA_SIZE if device.startswith("cuda") else CPU_SIZE)
    dtype = DTYPES[precision]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    cuda = device.startswith("cuda")
    best = float("inf")
    with tf32_matmuls(precision == "tf32") if cuda else nullcontext():
        for i in range(repeats + 2):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= 2:
                best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def cache_path(results_dir: str, device_name: str, precision: str) -> Path:
    threads = torch.get_num_threads()
    name = f"{socket.gethostname()}_{device_name}_{precision}_{threads}threads".replace("/", "-").replace(" ", "-")
    return Path(results_dir) / ".cache" / "peak" / f"{name}.json"


def measured_peak_tflops(results_dir: str, device: str, device_name: str, precision: str, measure: bool) -> float:
    """The cached peak for this host, device, precision and threads; measured first if `measure` (the node's
    local rank 0: the caller makes the others wait) and nothing is cached yet."""
    path = cache_path(results_dir, device_name, precision)
    if measure and not path.is_file():
        peak = matmul_tflops(device, precision)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"peak_tflops": peak, "device_name": device_name, "precision": precision}))
        os.replace(tmp, path)
    return json.loads(path.read_text())["peak_tflops"]
