"""Checks on the composed config, run by the controller before any process starts.

Every error says what was expected, what was given and which key to change.
"""

from __future__ import annotations

import os

from bench.topology import TopologyError, resolve_degrees

FAULT_KINDS = ("raise", "exit", "hang", "oom")


class ConfigError(ValueError):
    pass


def reject(key: str, expected: str, got, hint: str = "") -> None:
    """Raise the one error format bench uses for bad input."""
    raise ConfigError(f"{key}: expected {expected}, got {got!r}. Change `{key}=` on the command line{hint}.")


def _positive_int(cfg: dict, key: str) -> None:
    node = cfg
    for part in key.split("."):
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int) or node < 1:
        reject(key, "a positive integer", node)


def world_size(cfg: dict) -> int:
    return cfg["launch"]["nnodes"] * cfg["launch"]["nproc"]


def check_backend(backend: str, device: str) -> None:
    """Run once the device is resolved: nccl moves only CUDA tensors."""
    if backend == "nccl" and device != "cuda":
        reject("backend", f"gloo or auto on device={device} (nccl needs CUDA devices)", backend)


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
        reject("warmup", f"an integer in [0, steps={cfg['steps']}) so that some steps are measured", cfg["warmup"])
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        reject("device", "one of auto, cpu, cuda", cfg["device"])
    if cfg["backend"] not in ("auto", "gloo", "nccl"):
        reject("backend", "one of auto, gloo, nccl", cfg["backend"])
    if isinstance(cfg["timeout_s"], bool) or not (isinstance(cfg["timeout_s"], (int, float)) and cfg["timeout_s"] > 0):
        reject("timeout_s", "a positive number of seconds", cfg["timeout_s"])
    if cfg["peak_tflops"] is not None and not (isinstance(cfg["peak_tflops"], (int, float)) and cfg["peak_tflops"] > 0):
        reject("peak_tflops", "a positive number of TFLOP/s or null", cfg["peak_tflops"])

    world = world_size(cfg)
    fault = cfg["fault"]
    if fault["rank"] is not None:
        if fault["kind"] not in FAULT_KINDS:
            reject("fault.kind", f"one of {', '.join(FAULT_KINDS)}", fault["kind"])
        if fault["phase"] not in ("train", "teardown"):
            reject("fault.phase", "train or teardown", fault["phase"])
        if not 0 <= fault["rank"] < world:
            reject("fault.rank", f"a rank in [0, {world}) or null", fault["rank"])

    from bench.strategies import strategy_module

    strategy = strategy_module(cfg["strategy"]["name"])
    if hasattr(strategy, "check"):
        strategy.check(cfg)  # first: a strategy's own message is the most specific
    degrees = parallel_degrees(cfg)
    for name, degree in degrees.items():
        if degree > 1 and name not in strategy.DEGREES:
            reject(f"parallel.{name}", f"1 with strategy={cfg['strategy']['name']} (it parallelises over "
                   f"{', '.join(sorted(strategy.DEGREES)) or 'nothing'})", degree)
    dp = degrees["dp"]
    if cfg["global_batch"] % dp:
        reject("global_batch", f"a multiple of the data-parallel size {dp} (each replica takes global_batch / {dp})",
               cfg["global_batch"])
    _check_knobs(cfg, cfg["global_batch"] // dp)

    if cfg["device"] in ("cuda", "auto"):
        _check_cuda(cfg)


def parallel_degrees(cfg: dict) -> dict[str, int]:
    try:
        return resolve_degrees(cfg["parallel"], world_size(cfg))
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None


def _check_knobs(cfg: dict, per_rank_batch: int) -> None:
    if cfg["precision"] not in ("fp32", "bf16", "fp16"):
        reject("precision", "one of fp32, bf16, fp16", cfg["precision"])
    _positive_int(cfg, "grad_accum")
    if per_rank_batch % cfg["grad_accum"]:
        reject("grad_accum", f"a divisor of the per-replica batch {per_rank_batch}", cfg["grad_accum"])
    if cfg["verify"] and cfg["precision"] != "fp32":
        reject("precision", "fp32 with verify=true (parity is checked in full precision)", cfg["precision"])


def _check_cuda(cfg: dict) -> None:
    import torch

    if not torch.cuda.is_available():
        if cfg["device"] == "cuda":
            reject("device", "cpu or auto: no CUDA device is visible on this machine", "cuda")
        return
    visible = torch.cuda.device_count()
    if cfg["launch"]["nproc"] > visible:
        reject(
            "launch.nproc",
            f"at most {visible}, the CUDA devices visible here (one per rank; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
            cfg["launch"]["nproc"],
        )
