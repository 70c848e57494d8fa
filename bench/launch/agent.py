"""torchrun's agent, run inside the controller: start this node's ranks as `python -m <worker> <run_dir>`, watch
them, and say how they ended. Shared by `launch=local` and `launch=multinode`."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from bench.launch import LaunchOutcome, Worker
from bench.launch.process import RunTimeout, deadline, environment, rank_environment, restored_signal_handlers


def threads_per_rank(nproc: int, requested: int | None, env=os.environ) -> int | None:
    """The OMP_NUM_THREADS bench gives its ranks, exactly as torchrun would: what the user chose
    (`launch.omp_num_threads`), else whatever the environment already says (None: nothing to set), else 1
    per rank when several ranks share the node and nothing when there is one. Anything else would make bench's
    ranks run at another speed than the user's own `torchrun` (or plain `python`) would."""
    if requested is not None:
        return requested
    if "OMP_NUM_THREADS" in env or nproc == 1:
        return None
    return 1


def launch_config(cfg: dict, run_dir: Path, **rendezvous):
    """torchrun's LaunchConfig for this node's `launch.nproc` ranks. The LaunchConfig defaults (etcd, 3
    restarts) are wrong for a benchmark: a run that silently restarts is not one run."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(
        nproc_per_node=cfg["launch"]["nproc"],
        role="bench",
        max_restarts=0,
        monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=str(run_dir / "torchelastic")),
        **rendezvous,
    )


def run_ranks(config, worker: Worker, run_dir: Path, cfg: dict) -> LaunchOutcome:
    """Run torchrun's agent until the ranks end, fail, time out or the controller is signalled.

    In every case but success the agent has stopped all ranks (SIGTERM, then SIGKILL) before this returns.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    launch = cfg["launch"]
    threads = threads_per_rank(launch["nproc"], launch["omp_num_threads"])
    with environment(rank_environment(threads)), restored_signal_handlers():
        try:
            with deadline(cfg["timeout_s"]):
                elastic_launch(config, sys.executable)("-u", "-m", worker.module, str(run_dir))
        except ChildFailedError as exc:
            # The first failure is the cause; the others are usually peers losing their connection to it.
            by_time = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
            return LaunchOutcome("failed", failed_ranks={rank: _describe(failure) for rank, failure in by_time})
        except RunTimeout:
            detail = f"no end after timeout_s={cfg['timeout_s']}: every rank was stopped"
            return LaunchOutcome("timeout", detail=detail)
        except SignalException as exc:
            name = signal.Signals(exc.sigval).name
            return LaunchOutcome("interrupted", detail=f"controller received {name}: ranks stopped", signal=exc.sigval)
        except RendezvousError as exc:
            # e.g. the other nodes never came (wrong endpoint or id, not started): no rank of this node ran
            detail = f"rendezvous failed, no rank started: {type(exc).__name__}: {' '.join(str(exc).split())}"
            if launch["nnodes"] > 1:
                detail += (
                    f" (are the other {launch['nnodes'] - 1} node(s) running the same command, with "
                    "the same launch.rdzv_endpoint and launch.rdzv_id?)"
                )
            return LaunchOutcome("failed", detail=detail[:1000])
    return LaunchOutcome("ok")


def _describe(failure) -> str:
    """A failed rank in one line: the exception message its error file recorded, else its exit code."""
    message = failure.message
    if isinstance(message, dict):  # the worker's @record error file
        message = message.get("message") or str(message)
    if not message or message.startswith("To enable traceback"):
        message = f"exited with code {failure.exitcode}"
    return " ".join(str(message).split())[:1000]
