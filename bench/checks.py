"""Checks on the composed config, run by the controller before any process starts.

Every refusal has one format, `bench.errors.reject(key, expected, got, hint)`: what was expected, what was given
and which key to change. The launch group's keys are checked by the launcher's module (`bench.launch`), a
strategy's own knobs by its `check(cfg)` and what it needs of the model by the model's (`bench.strategies`,
`bench.models`), a data source's keys by its own (`bench.data`).
"""

from __future__ import annotations

from bench.errors import positive_int, reject, value_at
from bench.parallel.topology import parallel_degrees, world_size

FAULT_KINDS = ("raise", "exit", "hang", "oom")
PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(requested: str) -> str:
    """`auto` becomes cuda when a GPU is visible, else cpu."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def check_backend(backend: str, device: str) -> None:
    """Run once the device is resolved: nccl moves only CUDA tensors."""
    if backend == "nccl" and device != "cuda":
        reject("backend", f"gloo or auto on device={device} (nccl needs CUDA devices)", backend)


SECTIONS = ("strategy", "model", "data", "launch", "parallel", "optim", "fault", "comm")


def check_sections(cfg: dict) -> None:
    """A group of keys stays a group: `optim=sgd` composes (Hydra replaces the node) but means `optim.name=sgd`."""
    for section in SECTIONS:
        if section in cfg and not isinstance(cfg[section], dict):
            reject(section, f"a group of keys (set one with {section}.<key>=..., e.g. `python -m bench --cfg job` "
                   "shows them)", cfg[section])


def check_run_keys(cfg: dict) -> None:
    """The keys every bench command shares (training runs and the collectives benchmark): the launch group,
    device, backend and timeout."""
    from bench.launch import check_launch

    check_sections(cfg)
    check_launch(cfg)
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        reject("device", "one of auto, cpu, cuda", cfg["device"])
    if cfg["backend"] not in ("auto", "gloo", "nccl"):
        reject("backend", "one of auto, gloo, nccl", cfg["backend"])
    timeout = cfg["timeout_s"]
    if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and timeout > 0):
        reject("timeout_s", "a positive number of seconds", timeout)
    limit = cfg.get("memory_limit_gb")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        reject("memory_limit_gb", "a positive number of GB, or null (no limit)", limit)
    expected = cfg.get("predicted_step_time_ms")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, (int, float)) or expected <= 0):
        reject("predicted_step_time_ms", "a positive number of milliseconds, or null", expected)
    entries = cfg.get("flight_recorder_entries", 0)  # training runs only: bench.comm times bare collectives
    if isinstance(entries, bool) or not (isinstance(entries, int) and entries >= 0):
        reject("flight_recorder_entries", "a whole number of collectives (0: off)", entries)


def pin_device(cfg: dict) -> None:
    """Once the keys are valid: refuse a launcher this machine cannot use, then resolve `device=auto` and check
    the backend against it, so that every rank agrees on both."""
    from bench.launch import launcher_spec

    launcher_spec(cfg["launch"]["name"]).check_here(cfg)
    cfg["device"] = resolve_device(cfg["device"])
    check_backend(cfg["backend"], cfg["device"])


def validate(cfg: dict) -> None:
    """Every check of a training benchmark's config (`python -m bench`)."""
    from bench.data import check_data
    from bench.launch import launcher_spec
    from bench.models import check_model
    from bench.strategies import strategy_spec

    check_profile(cfg)
    check_run_keys(cfg)
    for key in ("steps", "global_batch", "repeats"):
        positive_int(cfg, key)
    launcher = launcher_spec(cfg["launch"]["name"])
    if cfg["repeats"] > 1 and launcher.run_id is not None:
        reject("repeats", f"1 with launch={launcher.name} (its ranks meet once, under one id every node "
               "shares: run the command again, with a new id, for another repeat)", cfg["repeats"])
    if not isinstance(cfg["warmup"], int) or not 0 <= cfg["warmup"] < cfg["steps"]:
        reject("warmup", f"an integer in [0, steps={cfg['steps']}) so that some steps are measured", cfg["warmup"])
    peak = cfg["peak_tflops"]
    if peak not in (None, "measure") and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or peak <= 0):
        reject("peak_tflops", "a positive number of TFLOP/s, measure (a matrix-product benchmark on the run's "
               "device) or null (the table's figure for known GPUs)", peak)
    _check_fault(cfg)
    _check_optim(cfg)
    strategy = strategy_spec(cfg["strategy"]["name"])
    check_model(cfg, strategy.model_needs(cfg))  # the model's own message for what it cannot give is the most specific
    strategy.check(cfg)
    if strategy.single_process and world_size(cfg) != 1:
        key = "launch.nnodes" if cfg["launch"]["nnodes"] > 1 else "launch.nproc"
        reject(key, f"1 with strategy={strategy.name} (one process drives its device(s))", value_at(cfg, key),
               "; or pick a strategy of one process per device")
    degrees = parallel_degrees(cfg)
    for name, degree in degrees.items():
        if degree > 1 and name not in strategy.degrees:
            reject(f"parallel.{name}", f"1 with strategy={strategy.name} (it parallelises over "
                   f"{', '.join(sorted(strategy.degrees)) or 'nothing'})", degree)
    dp = degrees["dp"]
    if cfg["global_batch"] % dp:
        reject("global_batch", f"a multiple of the data-parallel size {dp} (each replica takes global_batch / {dp})",
               cfg["global_batch"])
    _check_knobs(cfg, cfg["global_batch"] // dp)
    check_data(cfg)


def check_profile(cfg: dict) -> None:
    """The `profile` group (`profile=true` reaches here as `profile.enabled=true`, see `bench.app.expand_switches`)."""
    profile = cfg["profile"]
    if not isinstance(profile, dict):
        reject("profile", "true, false or its keys (profile.enabled=true profile.steps=10)", profile)
    for key in ("enabled", "memory"):
        if not isinstance(profile[key], bool):
            reject(f"profile.{key}", "true or false", profile[key])
    positive_int(cfg, "profile.steps")
    if profile["memory"] and not profile["enabled"]:
        reject("profile.memory", "false unless the run is profiled", True, " (add profile.enabled=true)")
    if profile["memory"] and resolve_device(cfg["device"]) != "cuda":
        reject("profile.memory", "false without a GPU (it records the CUDA allocator)", True)


def _check_fault(cfg: dict) -> None:
    fault = cfg["fault"]
    if fault["rank"] is None:
        return
    if fault["kind"] not in FAULT_KINDS:
        reject("fault.kind", f"one of {', '.join(FAULT_KINDS)}", fault["kind"])
    if fault["phase"] not in ("train", "teardown"):
        reject("fault.phase", "train or teardown", fault["phase"])
    world = world_size(cfg)
    if not 0 <= fault["rank"] < world:
        reject("fault.rank", f"a rank in [0, {world}) or null", fault["rank"])


OPTIMIZERS = ("sgd", "adamw")


def _check_optim(cfg: dict) -> None:
    optim = cfg["optim"]
    if optim["name"] not in OPTIMIZERS:
        reject("optim.name", f"one of {', '.join(OPTIMIZERS)}", optim["name"])
    for key, lowest in (("lr", "> 0"), ("momentum", ">= 0"), ("weight_decay", ">= 0")):
        value = optim[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (value <= 0 if lowest == "> 0" else value < 0):
            reject(f"optim.{key}", f"a number {lowest}", value)


def _check_knobs(cfg: dict, per_replica_batch: int) -> None:
    if cfg["precision"] not in PRECISIONS:
        reject("precision", f"one of {', '.join(PRECISIONS)}", cfg["precision"])
    positive_int(cfg, "grad_accum")
    if per_replica_batch % cfg["grad_accum"]:
        reject("grad_accum", f"a divisor of the per-replica batch {per_replica_batch}", cfg["grad_accum"])
    if cfg["verify"] and cfg["precision"] != "fp32":
        reject("precision", "fp32 with verify=true (parity is checked in full precision)", cfg["precision"])


def config_warnings(cfg: dict) -> list[str]:
    """What a valid config should still be told about, in the row and the summary."""
    warnings = []
    if cfg["precision"] == "fp16" and cfg["device"] == "cpu":
        warnings.append("precision=fp16 on CPU: autocast to fp16 has few fast CPU kernels (28x slower than fp32 "
                        "was seen here); bf16 is the CPU's reduced precision")
    from bench.strategies import strategy_spec
    from bench.strategies.stages import split_unchecked

    if "pipeline_split" in strategy_spec(cfg["strategy"]["name"]).model_needs(cfg):
        warnings += [why for why in [split_unchecked(cfg)] if why]
    return warnings
