"""The launch group's keys and the devices they ask for, checked before anything starts.

`check_launch` also fills the keys a launcher derives: `launch=inline` reads the world from the environment
(torchrun's or an srun step's); `launch=slurm` sets one rank per GPU unless `launch.nproc` is given, and
resolves `device=auto` from `launch.gpus_per_node` (the controller may run on a login node without GPUs).
"""

from __future__ import annotations

import os
import shutil

from bench.checks import ConfigError, positive_int, reject
from bench.launch import NAMES

SLURM_CLUSTERS = (None, "slurm", "local")


def check_launch(cfg: dict) -> None:
    launch = cfg["launch"]
    name = launch["name"]
    if name not in NAMES:
        reject("launch", f"one of {', '.join(NAMES)}", name)
    if name == "local" and launch["nnodes"] != 1:
        hint = "; use launch=multinode or launch=slurm for more machines"
        reject("launch.nnodes", "1 with launch=local (this machine)", launch["nnodes"], hint)
    if name == "multinode":
        _check_multinode(cfg)
    if name == "inline":
        _check_inline(cfg)
    if name == "slurm":
        _check_slurm(cfg)
    for key in ("launch.nproc", "launch.nnodes"):
        positive_int(cfg, key)
    if launch.get("omp_num_threads") is not None:
        positive_int(cfg, "launch.omp_num_threads")
    grace = launch.get("teardown_grace_s", 1)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace <= 0:
        reject("launch.teardown_grace_s", "a positive number of seconds", grace)


def _check_multinode(cfg: dict) -> None:
    launch = cfg["launch"]
    positive_int(cfg, "launch.nnodes")
    endpoint = launch["rdzv_endpoint"]
    host, _, port = str(endpoint).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        reject("launch.rdzv_endpoint", "host:port of the rendezvous store, e.g. node0.example:29500", endpoint)
    rdzv_id = launch["rdzv_id"]
    if rdzv_id is not None and not (isinstance(rdzv_id, (str, int)) and str(rdzv_id).strip()):
        reject("launch.rdzv_id", "a non-empty id shared by every node", rdzv_id)
    if launch["nnodes"] > 1 and rdzv_id is None:
        reject(
            "launch.rdzv_id",
            f"an id shared by the {launch['nnodes']} nodes and new for every run (e.g. $SLURM_JOB_ID) "
            "when launch.nnodes > 1",
            rdzv_id,
        )


def _check_inline(cfg: dict) -> None:
    from bench.launch.world import launched_world

    launch = cfg["launch"]
    world = launched_world()
    if world.world_size % world.local_world_size:
        reject("launch", f"the same number of ranks on every node ({world.source})", launch["name"])
    for key, value in (("nnodes", world.nnodes), ("nproc", world.local_world_size)):
        if launch[key] is not None and launch[key] != value:
            reject(f"launch.{key}", f"null or {value}, as the launcher ({world.source}) says", launch[key])
        launch[key] = value


def _check_slurm(cfg: dict) -> None:
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
    if launch["cluster"] not in SLURM_CLUSTERS:
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


def check_devices(cfg: dict) -> None:
    """The CUDA devices the ranks ask for are visible here: for every launcher but slurm, whose ranks run on
    other machines (its keys were checked against `launch.gpus_per_node` instead)."""
    if cfg["launch"]["name"] != "slurm" and cfg["device"] in ("cuda", "auto"):
        _check_cuda(cfg)


def check_can_submit(cfg: dict) -> None:
    """`launch=slurm` needs a machine that can submit jobs (checked when a run is prepared, not when a config
    is validated: a config can be valid on a machine without SLURM)."""
    if cfg["launch"]["name"] == "slurm" and cfg["launch"]["cluster"] in (None, "slurm") and not shutil.which("sbatch"):
        raise ConfigError(
            "launch: expected a machine that can submit SLURM jobs with launch=slurm (no `sbatch` on PATH). "
            "Run bench from the cluster's login node, or use launch=local / launch=multinode."
        )


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
