"""Checks on the composed config, run by the controller before any process starts.

Every refusal has one format, `bench.errors.reject(key, expected, got, hint)`: what was expected, what was given
and which key to change. The launch group's keys are checked by the launcher's module (`bench.launch`), a
strategy's own knobs by its `check(cfg)` and what it needs of the model by the model's (`bench.strategies`,
`bench.models`), a data source's keys by its own (`bench.data`).
"""

from __future__ import annotations

from bench.checks_shape import check_shape
from bench.errors import is_finite_number, is_integer, positive_int, positive_number, reject, value_at
from bench.parallel.topology import parallel_degrees, world_size

FAULT_KINDS = ("raise", "exit", "hang", "oom")
PRECISIONS = ("fp32", "bf16", "fp16")
# The run's deadline is a SIGALRM timer (bench.launch.process.deadline): Python's signal.setitimer takes at most
# 2**63 ns (about 9.2e9 s; 9.3e9 raised "OverflowError: timestamp out of range for platform time_t" here, and
# timeout_s=inf did so in the controller). 1e9 s (31 years) is below it and longer than any run.
MAX_TIMEOUT_S = 10**9
# memory_limit_gb becomes setrlimit(RLIMIT_DATA, <the rank's data segment> + limit) on CPU
# (bench.rank.runtime.limit_memory), which takes at most 2**63 - 1 bytes ("Python int too large to convert to C
# long" past it: every rank died so at memory_limit_gb=1e30). 1e9 GB (about 2**60 bytes, an exabyte) leaves
# the data segment 7/8 of that range.
MAX_MEMORY_GB = 10**9
# flight_recorder_entries becomes TORCH_FR_BUFFER_SIZE, which torch parses with std::stoi (c10d
# getCvarInt, torch/csrc/distributed/c10d/Utils.hpp): past 2**31 - 1 it throws in the rank's C++ and the rank
# aborts (SIGABRT in 3 of 4 tries at 10**12, a hang in the 4th). Below that, each entry kept costs the rank host
# memory (its Python stack: 780 bytes from a shallow one, 1.8 KB 40 frames deeper, measured here on gloo):
# 100,000 entries are 50 times torch's own default of 2000 (FlightRecorder.hpp), 80 to 180 MB a rank.
MAX_FLIGHT_RECORDER_ENTRIES = 100_000
# torch.manual_seed takes [-2**63, 2**64 - 1]; the data sources seed generators with seed + 1 and seed + 2
# (bench.data): [0, 2**63 - 1] keeps those in range too (seed=2**64 failed in every rank).
MAX_SEED = 2**63 - 1


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
    check_switches(cfg, ("progress",))
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        reject("device", "one of auto, cpu, cuda", cfg["device"])
    if cfg["backend"] not in ("auto", "gloo", "nccl"):
        reject("backend", "one of auto, gloo, nccl", cfg["backend"])
    if not positive_number(cfg["timeout_s"], MAX_TIMEOUT_S):
        reject("timeout_s", f"a positive number of seconds, at most {MAX_TIMEOUT_S} (31 years: the deadline is a "
               "setitimer)", cfg["timeout_s"])
    # training runs only, below: bench.comm times bare collectives
    limit = cfg.get("memory_limit_gb")
    if limit is not None and not positive_number(limit, MAX_MEMORY_GB):
        reject("memory_limit_gb", f"a positive number of GB, at most {MAX_MEMORY_GB} (what setrlimit takes), or "
               "null (no limit)", limit)
    expected = cfg.get("predicted_step_time_ms")
    if expected is not None and not positive_number(expected):
        reject("predicted_step_time_ms", "a positive number of milliseconds, or null", expected)
    entries = cfg.get("flight_recorder_entries", 0)
    if not is_integer(entries) or not 0 <= entries <= MAX_FLIGHT_RECORDER_ENTRIES:
        reject("flight_recorder_entries", f"a whole number of collectives, 0 (off) to {MAX_FLIGHT_RECORDER_ENTRIES} "
               "(50 times torch's default of 2000)", entries)


def check_switches(cfg: dict, keys: tuple[str, ...]) -> None:
    """Keys that are true or false: YAML reads `compile=nan` as a float and `verify=yes` as a string, both of which
    an `if` takes as true."""
    for key in keys:
        if not isinstance(cfg[key], bool):
            reject(key, "true or false", cfg[key])


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

    check_shape(cfg)
    check_profile(cfg)
    check_run_keys(cfg)
    check_switches(cfg, ("compile", "activation_checkpointing", "verify", "force"))
    if not isinstance(cfg["compile_backend"], str) or not cfg["compile_backend"].strip():
        reject("compile_backend", "a torch.compile backend's name (inductor, aot_eager...)", cfg["compile_backend"])
    for key in ("steps", "global_batch", "repeats"):
        positive_int(cfg, key)
    if not is_integer(cfg["seed"]) or not 0 <= cfg["seed"] <= MAX_SEED:
        reject("seed", "an integer in [0, 2**63 - 1] (torch.manual_seed's range)", cfg["seed"])
    launcher = launcher_spec(cfg["launch"]["name"])
    if cfg["repeats"] > 1 and launcher.run_id is not None:
        reject("repeats", f"1 with launch={launcher.name} (its ranks meet once, under one id every node "
               "shares: run the command again, with a new id, for another repeat)", cfg["repeats"])
    if not is_integer(cfg["warmup"]) or not 0 <= cfg["warmup"] < cfg["steps"]:
        reject("warmup", f"an integer in [0, steps={cfg['steps']}) so that some steps are measured", cfg["warmup"])
    peak = cfg["peak_tflops"]
    if peak not in (None, "measure") and not positive_number(peak):
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
    _check_context(cfg, degrees["cp"], strategy.model_needs(cfg))
    _check_experts(cfg, degrees["ep"], degrees["cp"], strategy.model_needs(cfg))
    dp = degrees["dp"]
    if cfg["global_batch"] % dp:
        reject("global_batch", f"a multiple of the data-parallel size {dp} (each replica takes global_batch / {dp})",
               cfg["global_batch"])
    _check_knobs(cfg, cfg["global_batch"] // dp)
    check_data(cfg)


def _check_context(cfg: dict, cp: int, needs: frozenset[str]) -> None:
    """Context parallelism cuts each sequence into 2 x cp equal chunks (`bench.parallel.context`), and needs a
    model that attends over them."""
    from bench.models import model_spec

    if cp == 1:
        return
    spec = model_spec(cfg["model"])
    if "context_parallel" in needs and spec.context_parallel is None:
        reject("parallel.cp", f"1 for model={cfg['model']['name']} (it has no attention over a sequence split "
               "across ranks: bench.models' context_parallel)", cp)
    tokens = spec.tokens_per_sample(cfg["model"])
    if tokens is None or tokens % (2 * cp):
        reject("parallel.cp", f"a degree whose 2 x cp chunks divide the sequence of {tokens} tokens (each cp rank "
               "holds two equal chunks, one early and one late)", cp, "; or change the model's seq_len")


def _check_experts(cfg: dict, ep: int, cp: int, needs: frozenset[str]) -> None:
    """Expert parallelism splits each mixture-of-experts layer's experts over ep ranks
    (`bench.parallel.experts`): the model must have such layers, each with a multiple of ep experts. The
    experts' gradients are reduced over the data-parallel ranks only, not over cp ranks too."""
    from bench.models import meta_instance
    from bench.parallel.experts import expert_layers

    if ep == 1 or "experts" not in needs:
        return
    if cp > 1:
        reject("parallel.ep", f"1 with parallel.cp={cp} (expert parallelism with context parallelism is not built: "
               "the experts' gradients would miss the other cp ranks' tokens)", ep)
    counts = {layer.num_experts for layer in expert_layers(meta_instance(cfg["model"])).values()}
    if not counts:
        reject("parallel.ep", f"1 for model={cfg['model'].get('preset') or cfg['model']['name']} (it has no "
               "mixture-of-experts layers with stacked expert weights to split)", ep)
    if any(n % ep for n in counts):
        reject("parallel.ep", f"a divisor of the experts per layer ({', '.join(map(str, sorted(counts)))})", ep)


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
    fault = cfg["fault"]  # its keys are checked even while it is off: none of these values is ever right
    if fault["kind"] not in FAULT_KINDS:
        reject("fault.kind", f"one of {', '.join(FAULT_KINDS)}", fault["kind"])
    if fault["phase"] not in ("train", "teardown"):
        reject("fault.phase", "train or teardown", fault["phase"])
    if not is_integer(fault["step"]):
        reject("fault.step", f"a step in [0, steps={cfg['steps']})", fault["step"])
    if fault["rank"] is None:
        return
    world = world_size(cfg)
    if not is_integer(fault["rank"]) or not 0 <= fault["rank"] < world:
        reject("fault.rank", f"a rank in [0, {world}) or null", fault["rank"])
    # a train fault fires at the end of step `fault.step` of range(steps) (bench.rank.worker.inject_fault): any
    # other step never comes, and the run would be recorded ok, with no fault
    if fault["phase"] == "train" and not 0 <= fault["step"] < cfg["steps"]:
        reject("fault.step", f"a step in [0, steps={cfg['steps']}) with fault.phase=train", fault["step"])


OPTIMIZERS = ("sgd", "adamw")


# Each optimizer float and where it must lie, finite: torch's SGD took lr=nan and lr=inf, and the run was recorded
# ok with a NaN loss. betas and eps (AdamW's) are checked where a config adds them (+optim.eps=...).
OPTIM_RANGES = {"lr": "> 0", "momentum": ">= 0", "weight_decay": ">= 0", "eps": "> 0"}


def _check_optim(cfg: dict) -> None:
    optim = cfg["optim"]
    if optim["name"] not in OPTIMIZERS:
        reject("optim.name", f"one of {', '.join(OPTIMIZERS)}", optim["name"])
    for key, lowest in OPTIM_RANGES.items():
        value = optim.get(key, 1.0)  # lr, momentum and weight_decay are required (bench.checks_shape)
        if not is_finite_number(value) or (value <= 0 if lowest == "> 0" else value < 0):
            reject(f"optim.{key}", f"a finite number {lowest}", value)
    betas = optim.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(_a_beta(b) for b in betas)):
        reject("optim.betas", "two numbers in [0, 1), e.g. [0.9,0.999]", betas)


def _a_beta(value) -> bool:
    return is_finite_number(value) and 0 <= value < 1


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
