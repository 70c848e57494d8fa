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

from bench.launch import LaunchOutcome, Worker
from bench.launch.process import RunTimeout, deadline, environment, restored_signal_handlers
from bench.launch.world import export_torch_env_from_slurm, launched_world, threads_for_task
from bench.rank.runtime import GATHER_ENV


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


def launch(cfg: dict, run_dir: Path, worker: Worker) -> LaunchOutcome:
    export_torch_env_from_slurm()
    world = launched_world()
    if world.rank == 0:
        # The folder is named after an id the ranks share, which a user may reuse: drop older result files.
        # No other rank can hand in results before rank 0 has joined the process group.
        shutil.rmtree(run_dir / "ranks", ignore_errors=True)
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
