"""Checks on the composed config, run by the controller before any process starts.

Every error says what was expected, what was given and which key to change.
"""

from __future__ import annotations

import os

FAULT_KINDS = ("raise", "exit", "hang", "oom")


class ConfigError(ValueError):
    pass


def _fail(key: str, expected: str, got, hint: str = "") -> None:
    raise ConfigError(f"{key}: expected {expected}, got {got!r}. Change `{key}=` on the command line{hint}.")


def _positive_int(cfg: dict, key: str) -> None:
    node = cfg
    for part in key.split("."):
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int) or node < 1:
        _fail(key, "a positive integer", node)


def world_size(cfg: dict) -> int:
    return cfg["launch"]["nnodes"] * cfg["launch"]["nproc"]


def check_backend(backend: str, device: str) -> None:
    """Run once the device is resolved: nccl moves only CUDA tensors."""
    if backend == "nccl" and device != "cuda":
        _fail("backend", f"gloo or auto on device={device} (nccl needs CUDA devices)", backend)


def resolve_device(requested: str) -> str:
    """`auto` becomes cuda when a GPU is visible, else cpu."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def validate(cfg: dict) -> None:
    for key in ("steps", "global_batch", "launch.nproc", "launch.nnodes"):
        _positive_int(cfg, key)
    if not isinstance(cfg["warmup"], int) or not 0 <= cfg["warmup"] < cfg["steps"]:
        _fail("warmup", f"an integer in [0, steps={cfg['steps']}) so that some steps are measured", cfg["warmup"])
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        _fail("device", "one of auto, cpu, cuda", cfg["device"])
    if cfg["backend"] not in ("auto", "gloo", "nccl"):
        _fail("backend", "one of auto, gloo, nccl", cfg["backend"])
    if isinstance(cfg["timeout_s"], bool) or not (isinstance(cfg["timeout_s"], (int, float)) and cfg["timeout_s"] > 0):
        _fail("timeout_s", "a positive number of seconds", cfg["timeout_s"])
    if cfg["peak_tflops"] is not None and not (isinstance(cfg["peak_tflops"], (int, float)) and cfg["peak_tflops"] > 0):
        _fail("peak_tflops", "a positive number of TFLOP/s or null", cfg["peak_tflops"])

    world = world_size(cfg)
    fault = cfg["fault"]
    if fault["rank"] is not None:
        if fault["kind"] not in FAULT_KINDS:
            _fail("fault.kind", f"one of {', '.join(FAULT_KINDS)}", fault["kind"])
        if fault["phase"] not in ("train", "teardown"):
            _fail("fault.phase", "train or teardown", fault["phase"])
        if not 0 <= fault["rank"] < world:
            _fail("fault.rank", f"a rank in [0, {world}) or null", fault["rank"])

    if cfg["strategy"]["name"] == "single" and world != 1:
        _fail(
            "launch.nproc",
            "1 with strategy=single (one process, one device)",
            cfg["launch"]["nproc"],
            "; or pick a multi-process strategy such as strategy=ddp",
        )
    data_parallel = world  # every rank is a data-parallel replica for the strategies so far
    if cfg["global_batch"] % data_parallel:
        _fail(
            "global_batch",
            f"a multiple of the data-parallel size {data_parallel} (the per-rank batch is "
            f"global_batch / {data_parallel})",
            cfg["global_batch"],
        )

    if cfg["device"] in ("cuda", "auto"):
        _check_cuda(cfg)


def _check_cuda(cfg: dict) -> None:
    import torch

    if not torch.cuda.is_available():
        if cfg["device"] == "cuda":
            _fail("device", "cpu or auto: no CUDA device is visible on this machine", "cuda")
        return
    visible = torch.cuda.device_count()
    if cfg["launch"]["nproc"] > visible:
        _fail(
            "launch.nproc",
            f"at most {visible}, the CUDA devices visible here (one per rank; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
            cfg["launch"]["nproc"],
        )
