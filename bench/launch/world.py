"""Where this process stands when something else launched it (torchrun, srun, torch.distributed.launch), and
the command-line handling that has to happen before Hydra parses the command line.

Kept free of torch and Hydra imports: the controller calls it before composing the config.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

# --------------------------------------------------------------------------- the legacy launcher's argument


def strip_local_rank(argv: list[str], env: MutableMapping[str, str] = os.environ) -> list[str]:
    """Drop `--local-rank=N` / `--local_rank=N` / `--local-rank N` (what `python -m torch.distributed.launch`
    passes to the script it starts, and what Hydra would refuse as an override) and put N in LOCAL_RANK."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        match = re.fullmatch(r"--local[-_]rank(?:=(\d+))?", arg)
        if match is None:
            out.append(arg)
            i += 1
            continue
        value = match.group(1)
        if value is None:  # "--local-rank N"
            value = argv[i + 1] if i + 1 < len(argv) else ""
            i += 1
        if not value.isdigit():
            raise SystemExit(f"bench: {arg} expects a rank number, got {value!r}")
        env.setdefault("LOCAL_RANK", value)
        i += 1
    return out


# --------------------------------------------------------------------------- ranks started by torchrun or srun


@dataclass(frozen=True)
class LaunchedWorld:
    """This process's place in a world some other launcher started (or a world of one)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    source: str  # "torchrun" (env:// variables), "srun" (a SLURM step), "none" (a plain process)

    @property
    def nnodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def in_slurm_step(env: Mapping[str, str] = os.environ) -> bool:
    """Inside `srun` (a job step), as opposed to an sbatch script's batch step, which has no SLURM_STEP_ID and
    whose SLURM_PROCID/SLURM_NTASKS describe the whole allocation rather than this process."""
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env


def launched_world(env: Mapping[str, str] = os.environ) -> LaunchedWorld:
    """torchrun's env:// variables first (torchrun inside srun sets them), then a SLURM step's variables."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return LaunchedWorld(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), local_world, "torchrun")
    if in_slurm_step(env):
        world = int(env["SLURM_STEP_NUM_TASKS"])
        return LaunchedWorld(
            int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), _slurm_local_tasks(env), "srun"
        )
    return LaunchedWorld(0, 1, int(env.get("LOCAL_RANK", 0)), 1, "none")


def _slurm_local_tasks(env: Mapping[str, str]) -> int:
    """Tasks of this step on this node, from SLURM_STEP_TASKS_PER_NODE ("4(x2),3" = 4, 4, 3 per node)."""
    counts: list[int] = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match:
            counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else (counts[0] if counts else 1)


def export_torch_env_from_slurm(env: MutableMapping[str, str] = os.environ) -> None:
    """In an srun step, set the env:// variables torch.distributed reads (as submitit's
    TorchDistributedEnvironment does): MASTER_ADDR = the step's first node, MASTER_PORT derived from the job
    and step ids (the same on every task) unless set, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE."""
    if "RANK" in env or not in_slurm_step(env):
        return
    world = launched_world(env)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or socket.gethostname()
    env.setdefault("MASTER_ADDR", first_host(nodelist))
    job, step = env.get("SLURM_JOB_ID", "0"), env.get("SLURM_STEP_ID", "0")
    seed = int(job) * 131 + int(step) if (job + step).isdigit() else sum(map(ord, job + step))
    env.setdefault("MASTER_PORT", str(20000 + seed % 40000))
    env.update(
        RANK=str(world.rank),
        WORLD_SIZE=str(world.world_size),
        LOCAL_RANK=str(world.local_rank),
        LOCAL_WORLD_SIZE=str(world.local_world_size),
    )


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[01-04,07],cpu1" -> "gpu01")."""
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    prefix, rest = nodelist.split("[", 1)
    return prefix + re.split(r"[-,\]]", rest, maxsplit=1)[0]


def threads_for_task(local_world_size: int, requested: int | None, env: Mapping[str, str] = os.environ) -> int:
    """CPU threads for one rank that some other launcher started: what the user asked for, else an
    OMP_NUM_THREADS already set (torchrun sets 1 per rank), else SLURM's --cpus-per-task, else this process's
    own cores if the launcher pinned it to some (taskset, SLURM's task/affinity), else the node's cores shared
    between its ranks."""
    if requested:
        return requested
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(env["SLURM_CPUS_PER_TASK"]))
    cores = len(os.sched_getaffinity(0))
    if cores < (os.cpu_count() or cores):
        return cores
    return max(1, cores // local_world_size)


def inline_run_id(env: Mapping[str, str] = os.environ) -> str:
    """A name every rank of one inline run agrees on without talking to the others."""
    if in_slurm_step(env) and "SLURM_JOB_ID" in env:
        return f"{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    if run_id and run_id != "none":  # torchrun --standalone or --rdzv-id=...
        return run_id
    # torchrun with its default static rendezvous: the ranks of one node share their parent, the agent
    return f"{socket.gethostname()}-{os.getppid()}"


# --------------------------------------------------------------------------- the command line before Hydra


def last_override(argv: list[str], key: str) -> str | None:
    value = None
    for arg in argv:
        if arg.startswith(f"{key}="):
            value = arg.split("=", 1)[1].strip("'\"")
    return value


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def prepare_argv(argv: list[str], run_name: str, env: MutableMapping[str, str] = os.environ) -> list[str]:
    """The command line Hydra should parse.

    - `--local-rank` from `python -m torch.distributed.launch` is taken out (into LOCAL_RANK).
    - A launcher whose nodes (or ranks) share one id (its `run_id`: `launch=multinode`, `launch=inline`) names
      the run folder after it, instead of Hydra's timestamp, which differs from node to node:
      `<results_dir>/<launcher>/<id>_<run_name>` (`run_name` is the app's Hydra interpolation, e.g.
      `${strategy.name}_${model.name}`). An explicit `hydra.run.dir=` / `hydra.sweep.dir=` on the command line
      wins.
    - Where the controller is itself a rank, ranks other than 0 write no `.hydra/` copy of their own.
    """
    from bench.launch import launcher_in, launcher_spec

    argv = strip_local_rank(argv, env)
    args = argv[1:]
    launcher = launcher_in(args)
    try:
        spec = launcher_spec(launcher) if launcher else None
    except ImportError:  # an unknown launcher: refused later, in one line
        return argv
    shared_id = spec.run_id(args, env) if spec and spec.run_id else None
    extra = []
    if shared_id and shared_id != "null":
        shared_id = _safe(shared_id)
        if not any(a.startswith("hydra.run.dir=") for a in args):
            extra.append(f"hydra.run.dir=${{results_dir}}/{launcher}/{shared_id}_{run_name}")
        if not any(a.startswith("hydra.sweep.dir=") for a in args):
            extra.append(f"hydra.sweep.dir=${{results_dir}}/sweeps/{launcher}-{shared_id}")
    if spec and spec.rank_in_controller and launched_world(env).rank != 0:
        extra.append("hydra.output_subdir=null")
    return argv + extra
