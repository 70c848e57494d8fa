"""`launch=inline`: this process already is a rank (under torchrun or srun): run the worker right here.

Every rank runs the controller (`torchrun ... -m bench launch=inline ...`, `srun python -m bench
launch=inline ...`); they all use one run folder named after an id they share (see
`bench.launch.world.prepare_argv`). Rank 0 gathers every rank's results through the process group, writes
them into its run folder and records the row; the other ranks record nothing.
"""

from __future__ import annotations

import logging
import shutil
import traceback
from contextlib import contextmanager
from pathlib import Path

from bench.errors import reject
from bench.launch import LaunchOutcome, Worker
from bench.launch.checks import check_visible_devices
from bench.launch.process import RunTimeout, deadline, environment, restored_signal_handlers
from bench.launch.world import (
    export_torch_env_from_slurm,
    inline_run_id,
    last_override,
    launched_world,
    threads_for_task,
)
from bench.runfolder import GATHER_ENV, RANKS

RUNS_HERE = False  # the ranks run already: nothing is checked before they start
SHARES_RUN_FOLDER = True  # every rank's controller writes into the one folder
RANK_IN_CONTROLLER = True


def run_id(args: list[str], env) -> str | None:
    """`launch.run_id`, else what the launcher that started the ranks gives them all (see `inline_run_id`)."""
    return last_override(args, "launch.run_id") or inline_run_id(env)


def check(cfg: dict) -> None:
    """The world is read from the environment (torchrun's, or an srun step's): the keys, if set, must agree."""
    launch = cfg["launch"]
    world = launched_world()
    if world.world_size % world.local_world_size:
        reject("launch", f"the same number of ranks on every node ({world.source})", launch["name"])
    for key, value in (("nnodes", world.nnodes), ("nproc", world.local_world_size)):
        if launch[key] is not None and launch[key] != value:
            reject(f"launch.{key}", f"null or {value}, as the launcher ({world.source}) says", launch[key])
        launch[key] = value
    check_visible_devices(cfg)


@contextmanager
def _worker_logging():
    """Let the worker set up its own logging (its rank log; warnings only on rank 0's terminal) as it does
    when torchrun starts it, instead of Hydra's handlers; Hydra's come back afterwards."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        root.handlers.extend(saved)
        root.setLevel(level)


def launch(cfg, run_dir: Path, worker: Worker) -> LaunchOutcome:
    export_torch_env_from_slurm()
    world = launched_world()
    if world.rank == 0:
        # The folder is named after an id the ranks share, which a user may reuse: drop older result files.
        # No other rank can hand in results before rank 0 has joined the process group.
        shutil.rmtree(run_dir / RANKS, ignore_errors=True)
    threads = threads_for_task(world.local_world_size, cfg["launch"]["omp_num_threads"])
    import torch

    torch.set_num_threads(threads)
    outcome = LaunchOutcome("ok")
    try:
        with (
            environment({GATHER_ENV: "1", "OMP_NUM_THREADS": str(threads)}),
            restored_signal_handlers(),
            _worker_logging(),
        ):
            with deadline(cfg["timeout_s"]):
                worker.run(run_dir)
    except RunTimeout:
        outcome = LaunchOutcome("timeout", detail=f"no end after timeout_s={cfg['timeout_s']}: rank stopped")
    except Exception as exc:  # the rank failed: record why, like torchrun's error file would
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        outcome = LaunchOutcome("failed", failed_ranks={world.rank: " ".join(last.split())[:1000]})
    if world.rank != 0:
        outcome.records_row = False
        outcome.note = f"rank {world.rank} of {world.world_size} ({outcome.status}): rank 0 records the row"
    return outcome
