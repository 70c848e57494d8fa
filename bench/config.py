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


def check_run_keys(cfg: dict) -> None:
    """The keys every bench command shares (training runs and the collectives benchmark)."""
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        reject("device", "one of auto, cpu, cuda", cfg["device"])
    if cfg["backend"] not in ("auto", "gloo", "nccl"):
        reject("backend", "one of auto, gloo, nccl", cfg["backend"])
    if isinstance(cfg["timeout_s"], bool) or not (isinstance(cfg["timeout_s"], (int, float)) and cfg["timeout_s"] > 0):
        reject("timeout_s", "a positive number of seconds", cfg["timeout_s"])


def validate(cfg: dict) -> None:
    _check_launch(cfg)
    for key in ("steps", "global_batch", "launch.nproc", "launch.nnodes"):
        _positive_int(cfg, key)
    if not isinstance(cfg["warmup"], int) or not 0 <= cfg["warmup"] < cfg["steps"]:
        reject("warmup", f"an integer in [0, steps={cfg['steps']}) so that some steps are measured", cfg["warmup"])
    check_run_keys(cfg)
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
    if cfg["data"]["name"] == "files":
        _check_files(cfg, dp)

    if cfg["device"] in ("cuda", "auto") and cfg["launch"]["name"] != "slurm":  # slurm ranks run elsewhere
        _check_cuda(cfg)


LAUNCHERS = ("local", "multinode", "inline", "slurm")
SLURM_CLUSTERS = (None, "slurm", "local")


def _check_launch(cfg: dict) -> None:
    """The launch group's keys. Fills the keys a launcher derives: `launch=inline` reads the world from the
    environment (torchrun's or an srun step's); `launch=slurm` sets one rank per GPU unless `launch.nproc` is
    given, and resolves `device=auto` from `launch.gpus_per_node` (the controller may run on a login node
    without GPUs)."""
    launch = cfg["launch"]
    name = launch["name"]
    if name not in LAUNCHERS:
        reject("launch", f"one of {', '.join(LAUNCHERS)}", name)
    if name == "local" and launch["nnodes"] != 1:
        hint = "; use launch=multinode or launch=slurm for more machines"
        reject("launch.nnodes", "1 with launch=local (this machine)", launch["nnodes"], hint)
    if name == "multinode":
        _positive_int(cfg, "launch.nnodes")
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
    if name == "inline":
        from bench.launch_env import launched_world

        world = launched_world()
        if world.world_size % world.local_world_size:
            reject("launch", f"the same number of ranks on every node ({world.source})", name)
        for key, value in (("nnodes", world.nnodes), ("nproc", world.local_world_size)):
            if launch[key] is not None and launch[key] != value:
                reject(f"launch.{key}", f"null or {value}, as the launcher ({world.source}) says", launch[key])
            launch[key] = value
    if name == "slurm":
        _check_slurm(cfg)


def _check_slurm(cfg: dict) -> None:
    launch = cfg["launch"]
    _positive_int(cfg, "launch.nodes")
    _positive_int(cfg, "launch.time_min")
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


def parallel_degrees(cfg: dict) -> dict[str, int]:
    try:
        return resolve_degrees(cfg["parallel"], world_size(cfg))
    except TopologyError as exc:
        raise ConfigError(str(exc)) from None


def _check_files(cfg: dict, dp: int) -> None:
    data = cfg["data"]
    for key in ("samples", "shard_size", "prefetch_factor"):
        _positive_int(cfg, f"data.{key}")
    if isinstance(data["num_workers"], bool) or not isinstance(data["num_workers"], int) or data["num_workers"] < 0:
        reject("data.num_workers", "an integer >= 0", data["num_workers"])
    if data["samples"] < cfg["global_batch"]:
        reject("data.samples", f"at least one global batch ({cfg['global_batch']} samples)", data["samples"])


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
