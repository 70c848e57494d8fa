"""`launch=local`: `launch.nproc` ranks on this machine, started by torchrun's agent in the controller."""

from __future__ import annotations

import uuid
from pathlib import Path

from bench.errors import reject
from bench.launch import LaunchOutcome, Worker
from bench.launch.agent import launch_config, run_ranks
from bench.launch.checks import check_visible_devices


def check(cfg: dict) -> None:
    name, nnodes = cfg["launch"]["name"], cfg["launch"]["nnodes"]
    if nnodes != 1:
        hint = "; use launch=multinode or launch=slurm for more machines"
        reject("launch.nnodes", f"1 with launch={name} (this machine)", nnodes, hint)
    check_visible_devices(cfg)


def launch(cfg, run_dir: Path, worker: Worker) -> LaunchOutcome:
    config = launch_config(
        cfg,
        run_dir,
        min_nodes=1,
        max_nodes=1,
        run_id=f"bench-{uuid.uuid4().hex[:12]}",
        # c10d on port 0: the store binds a free port itself, so concurrent runs never collide
        # (torchrun --standalone does the same).
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        rdzv_configs={"timeout": cfg["launch"]["rdzv_timeout_s"]},
        local_addr="127.0.0.1",  # the ranks' store on loopback too: a one-node run listens on nothing else
    )
    return run_ranks(config, worker, run_dir, cfg)
