"""`launch=slurm`: submit the ranks to SLURM through submitit, wait, stream rank 0's log, report how they ended.

One SLURM task per rank (`--nodes=launch.nodes --ntasks-per-node=launch.nproc`, `srun --kill-on-bad-exit=1`
so that one failing rank ends the job). Each task sets torch's env:// variables from SLURM's
(`submitit.helpers.TorchDistributedEnvironment`: MASTER_ADDR = the first node) and runs its rank in the task's
own process. The run folder must be on a filesystem the compute nodes share with the controller (submitit's
pickles and logs live in `<run_dir>/slurm/`); across nodes, rank 0 gathers the results anyway.

How a job ends becomes the row's status:
- every task returned: `ok` (the row is built from the ranks' result files, as for a local run);
- a rank raised: `failed` (or `oom`), with that rank and its exception;
- SLURM's time limit (`launch.time_min`) hit: `timeout`; bench's own `timeout_s` (counted from when the job
  starts running: time in the queue does not count) hit: the job is cancelled, `timeout`;
- the controller got SIGINT/SIGTERM: the job is cancelled, `interrupted`;
- anything else (a rank killed, a node lost): `failed` with SLURM's state.
A job that dies without writing its result is seen through `sacct` (every `launch.poll_s`): the cluster needs
accounting (slurmdbd); without it only `timeout_s` ends the wait.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import zlib
from pathlib import Path

from bench.errors import ConfigError, positive_int, reject
from bench.launch import LaunchOutcome, Worker
from bench.launch.process import environment, rank_environment
from bench.launch.slurm_job import Interrupted, Tail, raise_on_signals, refresh, settle, task_errors, task_successes
from bench.launch.world import threads_for_task
from bench.runfolder import LOGS, RANKS, rank_file

RUNS_HERE = False  # the ranks run on the cluster's compute nodes
CLUSTERS = (None, "slurm", "local")


# --------------------------------------------------------------------------- the keys, before anything starts


def check(cfg: dict) -> None:
    """One rank per GPU unless `launch.nproc` is given, and `device=auto` resolved from `launch.gpus_per_node`
    (the controller may run on a login node without GPUs)."""
    launch = cfg["launch"]
    positive_int(cfg, "launch.nodes")
    positive_int(cfg, "launch.time_min")
    gpus = launch["gpus_per_node"]
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        reject("launch.gpus_per_node", "a number of GPUs per node (0 for a CPU job)", gpus)
    if launch["nnodes"] != launch["nodes"]:
        expected = f"unset with launch=slurm (it follows launch.nodes={launch['nodes']})"
        reject("launch.nnodes", expected, launch["nnodes"], "; set launch.nodes instead")
    if launch["nproc"] is None:
        launch["nproc"] = gpus or 1
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if gpus else "cpu"
    if cfg["device"] == "cuda" and not gpus:
        reject("launch.gpus_per_node", "at least 1 with device=cuda", gpus)
    if cfg["device"] == "cuda" and launch["nproc"] > gpus:
        reject("launch.nproc", f"at most launch.gpus_per_node={gpus} (one GPU per rank)", launch["nproc"])
    if launch["cluster"] not in CLUSTERS:
        reject("launch.cluster", "null (SLURM) or local (tasks as local processes, for tests)", launch["cluster"])
    if launch["cluster"] == "local" and launch["nodes"] != 1:
        reject("launch.nodes", "1 with launch.cluster=local", launch["nodes"])
    poll = launch["poll_s"]
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or poll <= 0:
        reject("launch.poll_s", "a positive number of seconds", poll)
    if not isinstance(launch["sbatch"], dict):
        reject("launch.sbatch", "a mapping of sbatch options, e.g. {exclusive: true}", launch["sbatch"])
    if not isinstance(launch["setup"], list):
        reject("launch.setup", "a list of shell lines", launch["setup"])


def check_here(cfg: dict) -> None:
    """This machine can submit jobs (a config can be valid on a machine without SLURM)."""
    if cfg["launch"]["cluster"] in (None, "slurm") and not shutil.which("sbatch"):
        raise ConfigError(
            "launch: expected a machine that can submit SLURM jobs with launch=slurm (no `sbatch` on PATH). "
            "Run bench from the cluster's login node, or use launch=local / launch=multinode."
        )


# --------------------------------------------------------------------------- inside the job, one task per rank


def _time_limit_near(signum, frame) -> None:
    print(f"bench: SLURM signalled {signal.Signals(signum).name}: the job's time limit is near", file=sys.stderr)


# Rank 0's store listens on a port from the job id (every task computes the same), below Linux's ephemeral range
# (32768-60999), from which the kernel hands out the local ports of outgoing connections: submitit's own pick
# (20000-60000) once met one of them in use (EADDRINUSE, a failed job, in a suite run beside other tests).
FIRST_PORT, PORTS = 20000, 12000


def master_port(job_id: str) -> int:
    return FIRST_PORT + zlib.crc32(job_id.encode()) % PORTS  # an id of any form (SLURM's "123", "123_4" of an array)


def run_rank(worker: Worker, run_dir: str, omp_num_threads: int | None) -> None:
    """One rank, in its SLURM task (submitit unpickles and calls this on the compute node)."""
    import submitit
    import torch

    # submitit only logs SIGTERM and checkpoints/requeues on its USR2: a benchmark must end when SLURM ends it
    # (scancel, time limit), and never be requeued; SLURM's own state (TIMEOUT, CANCELLED) says what happened.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, _time_limit_near)
    os.environ["MASTER_PORT"] = str(master_port(submitit.JobEnvironment().job_id))
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    threads = threads_for_task(dist_env.local_world_size, omp_num_threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    worker.run(Path(run_dir))


# --------------------------------------------------------------------------- the controller's side


def _executor(cfg: dict, run_dir: Path):
    import submitit

    keys = cfg["launch"]
    executor = submitit.AutoExecutor(folder=run_dir / "slurm", cluster=keys["cluster"] or "slurm")
    setup = [f"export {key}={value}" for key, value in _task_environment().items()]
    params = {
        "name": f"bench-{run_dir.name}"[:100],
        "nodes": keys["nodes"],
        "tasks_per_node": keys["nproc"],
        "timeout_min": keys["time_min"],
        # one failing rank ends the job at once (the others would wait in a collective until the time limit)
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        "slurm_setup": setup + list(keys["setup"]),
        # submitit's pre-timeout signal (bench only logs it); at most half the time limit before the end
        "slurm_signal_delay_s": min(90, keys["time_min"] * 30),
        "slurm_additional_parameters": dict(keys["sbatch"]),
    }
    optional = {
        "gpus_per_node": keys["gpus_per_node"] or None,
        "cpus_per_task": keys["cpus_per_task"],
        "mem_gb": keys["mem_gb"],
        "slurm_partition": keys["partition"],
        "slurm_account": keys["account"],
        "slurm_qos": keys["qos"],
        "slurm_constraint": keys["constraint"],
    }
    params.update({key: value for key, value in optional.items() if value is not None})
    executor.update_parameters(**params)
    return executor


def _task_environment() -> dict[str, str]:
    """What bench sets for every task; the thread count is set by each task itself (`run_rank`)."""
    return rank_environment(threads=None)


def launch(cfg, run_dir: Path, worker: Worker) -> LaunchOutcome:
    """Submit one job for this run, wait for it (streaming rank 0's log) and say how it ended."""
    keys = cfg["launch"]
    shutil.rmtree(run_dir / RANKS, ignore_errors=True)
    try:
        executor = _executor(cfg, run_dir)
        with environment(_task_environment()):
            job = executor.submit(run_rank, worker, str(run_dir), keys["omp_num_threads"])
    except Exception as exc:  # sbatch refused the job (unknown partition, too many GPUs, ...)
        return LaunchOutcome("failed", detail=f"SLURM refused the job: {' '.join(str(exc).split())}"[:1000])
    job_id = str(job.job_id)
    print(
        f"bench: submitted SLURM job {job_id} ({keys['nodes']} node(s) x {keys['nproc']} rank(s)); "
        f"submitit files in {run_dir / 'slurm'}",
        file=sys.stderr,
        flush=True,
    )
    outcome = _wait(job, cfg, run_dir)
    outcome.slurm_job_id = job_id if keys["cluster"] != "local" else None  # local: a process id, not a job
    return outcome


def _wait(job, cfg: dict, run_dir: Path) -> LaunchOutcome:
    keys = cfg["launch"]
    job_id = str(job.job_id)
    tail = Tail(rank_file(run_dir, LOGS, 0, ".log"), f"[slurm {job_id}] ")
    ended_by = None  # what bench did to the job, if anything: ("timeout", None) or ("interrupted", signum)
    running_since = None  # timeout_s counts from here: time in the queue is not the run's
    try:
        with raise_on_signals():
            last_refresh, last_state = 0.0, None
            while True:
                if time.monotonic() - last_refresh >= keys["poll_s"]:
                    refresh(job)
                    last_refresh = time.monotonic()
                if job.done():
                    break
                state = str(job.state)
                if state != last_state and state.upper() != "UNKNOWN":  # UNKNOWN: sacct has not seen it yet
                    print(f"[slurm {job_id}] {state}", file=sys.stderr, flush=True)
                    last_state = state
                if running_since is None and state.upper().startswith("RUNNING"):
                    running_since = time.monotonic()
                if running_since is not None and time.monotonic() - running_since > cfg["timeout_s"]:
                    ended_by = ("timeout", None)
                    break
                tail.flush()
                time.sleep(0.5)
    except Interrupted as exc:
        ended_by = ("interrupted", exc.signum)
    if ended_by:
        job.cancel(check=False)
    try:
        with raise_on_signals():
            settle(job)
    except Interrupted as exc:  # signalled again while waiting for SLURM: stop waiting, cancel the job
        job.cancel(check=False)
        ended_by = ended_by or ("interrupted", exc.signum)
    tail.flush()
    return _outcome(job, cfg, ended_by)


def _outcome(job, cfg: dict, ended_by: tuple[str, int | None] | None) -> LaunchOutcome:
    job_id = str(job.job_id)
    refresh(job)
    state = str(job.state)
    where = f"SLURM job {job_id}"
    if ended_by and ended_by[0] == "interrupted":
        name = signal.Signals(ended_by[1]).name
        return LaunchOutcome("interrupted", detail=f"controller received {name}: {where} cancelled", signal=ended_by[1])
    if ended_by:
        detail = f"no end after timeout_s={cfg['timeout_s']} of running: {where} cancelled"
        return LaunchOutcome("timeout", detail=detail)
    errors = task_errors(job)
    if errors:
        return LaunchOutcome("failed", failed_ranks=errors, detail=f"{where} ended {state}")
    if state.upper().startswith("TIMEOUT"):
        detail = f"{where} reached its time limit (launch.time_min={cfg['launch']['time_min']}): ranks stopped"
        return LaunchOutcome("timeout", detail=detail)
    if task_successes(job) == job.num_tasks:
        return LaunchOutcome("ok")
    logs = job.paths.folder
    return LaunchOutcome(
        "failed", detail=f"{where} ended {state} without a result from every rank (task logs in {logs})"
    )
