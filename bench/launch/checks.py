"""What every launcher's keys must be, and the checks several launchers share. A launcher's own keys are
checked by its module's `check` (see `bench.launch`)."""

from __future__ import annotations

import os

from bench.errors import positive_int, positive_number, reject

MOST_SECONDS = 1e9  # past this a deadline overflows the timers it reaches (asyncio, torch's store: C++ durations)


def check_common_keys(cfg: dict) -> None:
    """The keys every launch group has, once the launcher has filled the ones it derives."""
    launch = cfg["launch"]
    for key in ("launch.nproc", "launch.nnodes"):
        positive_int(cfg, key)
    if launch.get("omp_num_threads") is not None:
        positive_int(cfg, "launch.omp_num_threads")
    for key in ("teardown_grace_s", "rdzv_timeout_s"):
        if key in launch and not positive_number(launch[key], MOST_SECONDS):
            reject(f"launch.{key}", "a number of seconds > 0 and at most 1e9", launch[key])


def check_visible_devices(cfg: dict) -> None:
    """The CUDA devices this node's ranks ask for are visible here (a launcher whose ranks run on this machine
    calls it from its `check`)."""
    if cfg["device"] not in ("cuda", "auto"):
        return
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
