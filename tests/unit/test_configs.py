"""Every config in conf/ composes and validates, every experiment's sweep too, and bad values are refused with
the one message format (key, what was expected, what was given, the key to change). In-process: the
end-to-end cases (exit 2, nothing started) are in test_reliability.py."""

import itertools

import pytest
import torch
from omegaconf import OmegaConf

from bench import group_options
from bench.checks import validate
from bench.errors import ConfigError
from bench.strategies import strategy_spec
from conftest import CONF, compose_config, compose_plain

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "experiment")  # experiment: +experiment=
EXPERIMENTS = group_options("experiment")


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_option_composes_and_validates(group, option):
    cfg = compose_plain(f"{group}={option}")
    own = cfg[group].get("preset") or cfg[group]["name"]
    assert option == own, "a config's name is its file's (a preset's `preset` is)"
    if group == "strategy" and not strategy_spec(option).single_process:
        cfg["launch"]["nproc"] = 2
    validate(cfg)


def test_groups_the_contract_names_exist():
    assert {"strategy", "model", "data", "launch"} <= set(GROUPS)
    for key in ("steps", "warmup", "global_batch", "seed", "device", "results_dir"):
        assert key in compose_plain()


def refused(*overrides: str) -> str:
    """The message `validate` refuses the composed config with (the test fails if it is accepted)."""
    with pytest.raises(ConfigError) as caught:
        validate(compose_plain(*overrides))
    return str(caught.value)


BAD = [
    (["steps=0"], "steps", "a positive integer"),
    (["global_batch=-4"], "global_batch", "a positive integer"),
    (["launch.nproc=0"], "launch.nproc", "a positive integer"),
    (["warmup=40", "steps=40"], "warmup", "an integer in [0, steps=40)"),
    (["device=tpu"], "device", "one of auto, cpu, cuda"),
    (["backend=mpi"], "backend", "one of auto, gloo, nccl"),
    (["timeout_s=0"], "timeout_s", "a positive number of seconds"),
    (["flight_recorder_entries=-1"], "flight_recorder_entries", "a whole number of collectives"),
    (["strategy=single", "launch.nproc=2"], "launch.nproc", "1 with strategy=single"),
    (["strategy=dataparallel", "launch.nproc=2"], "launch.nproc", "1 with strategy=dataparallel"),
    (["strategy=modelparallel", "launch.nproc=2"], "launch.nproc", "1 with strategy=modelparallel"),
    (["strategy=ddp", "launch.nproc=2", "global_batch=7"], "global_batch", "a multiple of the data-parallel size 2"),
    (["peak_tflops=-1"], "peak_tflops", "a positive number"),
    (["peak_tflops=fast"], "peak_tflops", "measure (a matrix-product benchmark"),
    (["repeats=0"], "repeats", "a positive integer"),
    (["launch=multinode", "repeats=2"], "repeats", "1 with launch=multinode"),
    (["fault.rank=5"], "fault.rank", "a rank in [0, 1)"),
    (["fault.rank=0", "fault.kind=segv"], "fault.kind", "one of raise, exit, hang, oom"),
    (["strategy=ddp", "launch.nproc=2", "grad_accum=3", "global_batch=16"], "grad_accum", "a divisor"),
    (["strategy=ddp", "launch.nproc=2", "parallel.tp=2"], "parallel.tp", "1 with strategy=ddp"),
    (["strategy=ddp", "launch.nproc=4", "parallel.dp=3"], "parallel", "dp*cp*tp*pp == world size"),
    (["strategy=ddp", "launch.nproc=4", "parallel.dp_replicate=2"], "parallel.dp_replicate", "1 with strategy=ddp"),
    (["strategy=fsdp", "launch.nproc=4", "parallel.dp_replicate=3"], "parallel.dp_replicate",
     "a divisor of the data-parallel degree 4"),
    (["strategy=fsdp", "launch.nproc=4", "parallel.dp_replicate=0"], "parallel.dp_replicate", "a positive integer"),
    # context and expert parallelism: what the sequence, the model and the experts allow
    (["strategy=fsdp", "model=gpt", "launch.nproc=2", "parallel.cp=2", "model.seq_len=30"], "parallel.cp",
     "a degree whose 2 x cp chunks divide the sequence of 30 tokens"),
    (["strategy=fsdp", "launch.nproc=2", "parallel.cp=2"], "parallel.cp", "1 for model=mlp"),
    (["strategy=ddp", "model=gpt", "launch.nproc=2", "parallel.cp=2"], "parallel.cp", "1 with strategy=ddp"),
    (["strategy=fsdp", "model=gpt", "launch.nproc=2", "parallel.cp=2", "strategy.cp_method=tree"],
     "strategy.cp_method", "allgather (keys and values all-gathered) or ring"),
    (["strategy=fsdp", "model=gpt", "launch.nproc=2", "parallel.ep=2"], "parallel.ep", "1 for model=gpt"),
    (["strategy=fsdp", "model=gpt", "model.experts=3", "launch.nproc=2", "parallel.ep=2"], "parallel.ep",
     "a divisor of the experts per layer (3)"),
    (["strategy=fsdp", "model=gpt", "model.experts=4", "launch.nproc=2", "parallel.ep=3"], "parallel.ep",
     "a divisor of the data-parallel degree 2"),
    (["strategy=fsdp", "model=gpt", "model.experts=4", "launch.nproc=4", "parallel.cp=2", "parallel.ep=2"],
     "parallel.ep", "1 with parallel.cp=2"),
    (["model=gpt", "model.experts=4", "model.top_k=5"], "model.top_k", "the experts each token is sent to"),
    (["precision=fp8"], "precision", "one of fp32, bf16, fp16"),
    (["strategy=fsdp", "launch.nproc=2", "precision=fp16"], "precision", "fp32 or bf16 with strategy=fsdp"),
    (["precision=bf16", "verify=true"], "precision", "fp32 with verify=true"),
    (["strategy=zero", "launch.nproc=2", "strategy.overlap_with_ddp=true", "device=cpu"],
     "strategy.overlap_with_ddp", "false on gloo/CPU"),
    (["strategy=tensor", "launch.nproc=3", "model=gpt", "global_batch=3"], "model.n_heads", "a multiple of"),
    (["strategy=tensor", "launch.nproc=2", "model=cnn"], "model", "defines tp_plan"),
    (["strategy=fsdp", "launch.nproc=4", "parallel.tp=4", "model=gpt", "model.n_heads=6", "model.d_model=96"],
     "model.n_heads", "a multiple of the tensor-parallel degree 4"),
    (["strategy=tensor", "launch.nproc=2", "strategy.sequence_parallel=true"], "strategy.sequence_parallel",
     "false for model=mlp"),
    (["data=files", "data.samples=8"], "data.samples", "at least one global batch"),
    (["data=files", "data.num_workers=-1"], "data.num_workers", "an integer >= 0"),
    (["data.num_batches=0"], "data.num_batches", "a positive integer"),
    # the model's own sizes (its module's `check`)
    (["model=gpt", "model.d_model=100", "model.n_heads=3"], "model.d_model", "a multiple of model.n_heads=3"),
    (["model=gpt", "model.n_layers=0"], "model.n_layers", "a positive integer"),
    (["model.hidden=0"], "model.hidden", "a positive integer"),
    (["model.layers=-1"], "model.layers", "a positive integer"),
    (["model=cnn", "model.width=10", "model.groups=4"], "model.width", "a multiple of model.groups=4"),
    (["profile.enabled=true", "profile.steps=0"], "profile.steps", "a positive integer"),
    (["profile=sometimes"], "profile", "true, false or its keys"),
    (["profile.enabled=yes"], "profile.enabled", "true or false"),
    (["profile.memory=true"], "profile.memory", "false unless the run is profiled"),
    (["optim.name=foo"], "optim.name", "one of sgd, adamw"),
    (["optim.lr=0"], "optim.lr", "a finite number > 0"),
    (["optim.momentum=-0.5"], "optim.momentum", "a finite number >= 0"),
    (["launch.omp_num_threads=0"], "launch.omp_num_threads", "a positive integer"),
    (["launch.teardown_grace_s=0"], "launch.teardown_grace_s", "a number of seconds > 0"),
    # the launch group
    (["launch.nnodes=2"], "launch.nnodes", "1 with launch=local"),
    (["launch=multinode", "launch.nnodes=2"], "launch.rdzv_id", "an id shared by the 2 nodes"),
    (["launch=multinode", "launch.rdzv_endpoint=node0"], "launch.rdzv_endpoint", "host:port"),
    (["launch=slurm", "launch.nnodes=2"], "launch.nnodes", "unset with launch=slurm"),
    (["launch=slurm", "launch.time_min=0"], "launch.time_min", "a positive integer"),
    (["launch=slurm", "device=cuda"], "launch.gpus_per_node", "at least 1 with device=cuda"),
    (["launch=slurm", "launch.cluster=local", "launch.nodes=2"], "launch.nodes", "1 with launch.cluster=local"),
    (["launch=inline", "launch.nproc=4"], "launch.nproc", "null or 1"),
    # pipeline: a stage per rank
    (["strategy=pipeline", "launch.nproc=8"], "parallel.pp", "at most 4 stages"),
    (["strategy=pipeline", "launch.nproc=2", "strategy.schedule=interleaved", "strategy.stages_per_rank=4"],
     "strategy.stages_per_rank", "at most 4 stages"),
    (["strategy=pipeline", "launch.nproc=2", "strategy.microbatches=3"], "strategy.microbatches",
     "divisible by dp x microbatches"),
    (["strategy=pipeline", "launch.nproc=4", "parallel.dp=2", "global_batch=8", "strategy.microbatches=8"],
     "strategy.microbatches", "global_batch=8 / parallel.dp=2"),
    (["strategy=pipeline", "launch.nproc=2", "strategy.schedule=interleaved"], "strategy.stages_per_rank",
     "at least 2"),
    (["strategy=pipeline", "launch.nproc=2", "strategy.stages_per_rank=2"], "strategy.stages_per_rank",
     "1 with strategy.schedule"),
    (["strategy=pipeline", "launch.nproc=4", "strategy.schedule=1f1b", "strategy.microbatches=2"],
     "strategy.microbatches", "at least the number of stages"),
    (["strategy=pipeline", "launch.nproc=2", "strategy.schedule=zb"], "strategy.schedule", "one of gpipe"),
    (["strategy=pipeline", "launch.nproc=2", "strategy.schedule=zbv"], "strategy.stages_per_rank",
     "2 with strategy.schedule=zbv"),
    (["strategy=pipeline", "launch.nproc=2", "strategy.schedule=dualpipev", "strategy.stages_per_rank=2",
      "strategy.microbatches=2"], "strategy.microbatches", "at least the number of stages 2 x parallel.pp = 4"),
    (["strategy=pipeline", "launch.nproc=2", "strategy.schedule=interleaved_zb", "strategy.stages_per_rank=2",
      "compile=true"], "compile", "false with strategy.schedule=interleaved_zb"),
    (["strategy=pipeline", "launch.nproc=2", "strategy.schedule=zbv", "strategy.stages_per_rank=2",
      "activation_checkpointing=true"], "activation_checkpointing", "false with strategy.schedule=zbv"),
    (["strategy=pipeline", "launch.nproc=2", "grad_accum=2"], "grad_accum", "micro-batches"),
    (["strategy=pipeline", "launch.nproc=2", "precision=fp16"], "precision", "fp32 or bf16"),
    (["strategy=pipeline", "launch.nproc=4", "parallel.dp=2", "parallel.pp=2", "parallel.dp_replicate=2"],
     "strategy.fsdp", "true with parallel.dp_replicate=2"),
    (["strategy=pipeline", "launch.nproc=8", "parallel.tp=4", "parallel.pp=2", "model=gpt", "model.n_heads=2"],
     "model.n_heads", "a multiple of the tensor-parallel degree 4"),
    (["strategy=pipeline", "launch.nproc=2", "strategy.fsdp=maybe"], "strategy.fsdp", "true or false"),
    # modelparallel: a stage per device of one process
    (["strategy=modelparallel", "strategy.devices=[cpu,cpu,cpu,cpu,cpu]"], "strategy.devices", "at most 4 stages"),
    (["strategy=modelparallel", "strategy.devices=[tpu:0,cpu]"], "strategy.devices", "entries"),
    (["strategy=modelparallel", "strategy.devices=cpu"], "strategy.devices", "a list of devices"),
    (["strategy=modelparallel", "strategy.split_size=0"], "strategy.split_size", "a positive integer"),
]
# What the command line can put in a config that once got past the checks (a traceback, a crash in the ranks, a
# wrong row): each is one line now.
INPUT_SHAPES = [
    # names: a module to import, and the last part of the run folder's path
    (["model.name=foo"], "model.name", "one of cnn, custom, gpt, hf, mlp"),
    (["model.name=../../.."], "model.name", "one of cnn, custom, gpt, hf, mlp"),
    (["strategy.name=x/y"], "strategy.name", "one of dataparallel, ddp"),
    (["data.name=foo"], "data.name", "one of files, synthetic"),
    (["model.name=1"], "model.name", "one of"),
    # deleted keys (~key)
    (["~steps"], "steps", "a value (bench reads every key of its config"),
    (["~optim.lr"], "optim.lr", "a value"),
    (["~model"], "model", "a value"),
    (["~model.hidden"], "model.hidden", "a value"),
    (["~fault"], "fault", "a value"),
    (["~launch.nproc"], "launch.nproc", "a value"),
    (["~strategy.name"], "strategy.name", "a value"),
    (["results_dir="], "results_dir", "a folder (a non-empty path"),
    (["results_dir=' '"], "results_dir", "a folder (a non-empty path"),
    # numbers past what the code that takes them accepts
    (["timeout_s=inf"], "timeout_s", "a positive number of seconds, at most 1000000000"),
    (["timeout_s=1e10"], "timeout_s", "at most 1000000000"),
    (["memory_limit_gb=inf"], "memory_limit_gb", "a positive number of GB, at most 1000000000"),
    (["memory_limit_gb=nan"], "memory_limit_gb", "a positive number of GB"),
    (["memory_limit_gb=1e30"], "memory_limit_gb", "at most 1000000000 (what setrlimit takes)"),
    (["memory_limit_gb=true"], "memory_limit_gb", "a positive number of GB"),
    (["flight_recorder_entries=1000000000000"], "flight_recorder_entries", "0 (off) to 100000"),
    (["flight_recorder_entries=100001"], "flight_recorder_entries", "0 (off) to 100000"),
    (["flight_recorder_entries=true"], "flight_recorder_entries", "a whole number of collectives"),
    (["seed=18446744073709551616"], "seed", "an integer in [0, 2**63 - 1]"),
    (["seed=9223372036854775808"], "seed", "an integer in [0, 2**63 - 1]"),
    (["seed=-1"], "seed", "an integer in [0, 2**63 - 1]"),
    (["seed=2**64"], "seed", "an integer in [0, 2**63 - 1]"),
    (["seed=1.5"], "seed", "an integer in"),
    (["seed=true"], "seed", "an integer in"),
    (["peak_tflops=nan"], "peak_tflops", "a positive number"),
    (["peak_tflops=inf"], "peak_tflops", "a positive number"),
    (["predicted_step_time_ms=nan"], "predicted_step_time_ms", "a positive number"),
    # the optimizer's floats
    (["optim.lr=nan"], "optim.lr", "a finite number > 0"),
    (["optim.lr=inf"], "optim.lr", "a finite number > 0"),
    (["optim.lr=-0.1"], "optim.lr", "a finite number > 0"),
    (["optim.lr=true"], "optim.lr", "a finite number > 0"),
    (["optim.momentum=inf"], "optim.momentum", "a finite number >= 0"),
    (["optim.weight_decay=nan"], "optim.weight_decay", "a finite number >= 0"),
    (["optim.weight_decay=-0.01"], "optim.weight_decay", "a finite number >= 0"),
    (["optim.name=adamw", "+optim.eps=0"], "optim.eps", "a finite number > 0"),
    (["optim.name=adamw", "+optim.betas=[0.9,1.0]"], "optim.betas", "two numbers in [0, 1)"),
    (["optim.name=adamw", "+optim.betas=[0.9]"], "optim.betas", "two numbers in [0, 1)"),
    (["optim.name=adamw", "+optim.betas=[nan,0.9]"], "optim.betas", "two numbers in [0, 1)"),
    # booleans are not integers (Python's True == 1)
    (["warmup=true"], "warmup", "an integer in [0, steps=40)"),
    (["strategy=ddp", "launch.nproc=2", "fault.rank=true"], "fault.rank", "a rank in [0, 2)"),
    (["fault.rank=foo"], "fault.rank", "a rank in [0, 1)"),
    (["fault.step=true"], "fault.step", "a step in [0, steps=40)"),
    # switches are true or false (an `if` takes nan and "yes" as true)
    (["compile=nan"], "compile", "true or false"),
    (["verify=yes"], "verify", "true or false"),
    (["force=1"], "force", "true or false"),
    (["progress=maybe"], "progress", "true or false"),
    (["activation_checkpointing=2"], "activation_checkpointing", "true or false"),
    (["compile_backend="], "compile_backend", "a torch.compile backend's name"),
    (["compile_backend=true"], "compile_backend", "a torch.compile backend's name"),
    # the fault's keys, even while it is off
    (["fault.kind="], "fault.kind", "one of raise, exit, hang, oom"),
    (["fault.phase=../.."], "fault.phase", "train or teardown"),
    # a fault at a step that never comes
    (["fault.rank=0", "fault.step=40"], "fault.step", "a step in [0, steps=40) with fault.phase=train"),
    (["fault.rank=0", "fault.step=-1"], "fault.step", "a step in [0, steps=40)"),
]
BAD += INPUT_SHAPES
if not torch.cuda.is_available():
    BAD.append((["device=cuda"], "device", "cpu or auto: no CUDA device is visible"))
    BAD.append((["profile.enabled=true", "profile.memory=true"], "profile.memory", "false without a GPU"))


@pytest.mark.parametrize("overrides,key,expected", BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_bad_values_are_refused_naming_the_key(overrides, key, expected):
    message = refused(*overrides)
    assert message.startswith(f"{key}: expected "), message
    assert expected in message, message
    assert f"`{key.split('*')[0]}=`" in message or key == "parallel", "the message names the key to change"


def test_the_message_format_is_one_line_with_what_to_change():
    assert refused("steps=0") == "steps: expected a positive integer, got 0. Change `steps=` on the command line."


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=pipeline", "launch.nproc=2"],
        ["strategy=pipeline", "launch.nproc=2", "strategy.schedule=interleaved", "strategy.stages_per_rank=2"],
        ["strategy=pipeline", "launch.nproc=2", "strategy.schedule=dualpipev", "strategy.stages_per_rank=2",
         "strategy.microbatches=8", "global_batch=16", "model=gpt", "model.n_layers=4"],
        ["strategy=pipeline", "launch.nproc=4", "parallel.dp=2", "strategy.schedule=1f1b",
         "strategy.microbatches=2", "global_batch=8"],
        ["strategy=pipeline", "model=gpt", "model.n_layers=4", "launch.nproc=4"],
        ["strategy=pipeline", "model=cnn", "launch.nproc=2"],
        ["strategy=modelparallel", "strategy.split_size=8", "grad_accum=2"],
        ["strategy=fsdp", "launch.nproc=4", "parallel.tp=2", "model=gpt"],
        ["strategy=fsdp", "launch.nproc=8", "parallel.tp=2", "parallel.dp_replicate=2", "model=gpt"],
        ["strategy=fsdp", "launch.nproc=2", "strategy.reshard_after_forward=false", "strategy.offload=true"],
        # the bounds themselves, and what a fault off or at teardown does not read
        ["timeout_s=1000000000", "memory_limit_gb=1000000000", "flight_recorder_entries=100000"],
        ["seed=9223372036854775807", "memory_limit_gb=1e-3", "timeout_s=0.5"],
        ["fault.rank=0", "fault.step=39"],
        ["fault.rank=0", "fault.phase=teardown", "fault.step=1000"],
        ["fault.step=1000"],
        ["optim.name=adamw", "+optim.eps=1e-8", "+optim.betas=[0.9,0.999]", "optim.weight_decay=0"],
        ["results_dir=/tmp/somewhere/else"],
    ],
)
def test_good_configs_validate(overrides):
    validate(compose_plain(*overrides))


def integer_keys(*overrides: str) -> list[str]:
    from bench.configs import flatten

    return [k for k, v in flatten(compose_plain(*overrides)).items() if isinstance(v, int) and not isinstance(v, bool)]




@pytest.mark.parametrize("base", [["fault.rank=0"], ["strategy=ddp", "launch.nproc=2"], ["model=gpt"], ["model=cnn"],
                                  ["data=files"]], ids=" ".join)
def test_no_integer_key_takes_a_boolean(base):
    """YAML's true is Python's True, and True == 1: `warmup=true` ran with one warm-up step."""
    taken = []
    for key in integer_keys(*base):
        try:
            validate(compose_plain(*base, f"{key}=true"))
            taken.append(key)
        except ConfigError as exc:
            assert str(exc).startswith(f"{key}: expected "), exc
    assert taken == []


# ------------------------------------------------------------------------------------- before Hydra runs


def refused_by_the_app(*args: str) -> str:
    """The one line `python -m bench <args>` exits 2 with before Hydra makes any folder (in-process)."""
    import contextlib
    import io

    import bench.__main__ as bench_main
    from bench.overrides import refuse_what_hydra_cannot_compose

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exited:
        refuse_what_hydra_cannot_compose(bench_main.COMMAND.name, bench_main.COMMAND.config_name, list(args))
    assert exited.value.code == 2
    line = stderr.getvalue()
    assert line.count("\n") == 1 and line.startswith("bench: invalid config: "), line
    return line


LONG_KEY = "k" * 5000


@pytest.mark.parametrize("args,start", [
    (["model.name=../../.."], "model.name: expected one of"),
    (["model.name=foo"], "model.name: expected one of"),
    (["-m", "model.name=mlp,../x"], "model.name: expected one of"),
    (["strategy.name=.."], "strategy.name: expected one of"),
    (["model=../strategy/ddp"], "model: expected one of cnn"),  # Hydra loaded a strategy's file as the model
    (["model=../../.."], "model: expected one of cnn"),
    (["+experiment=../config"], "+experiment: expected one of regression"),
    (["~results_dir"], "results_dir: expected a value"),  # hydra.run.dir interpolates it: Hydra's traceback
    (["~model.name"], "model.name: expected a value"),
    (["~steps"], "steps: expected a value"),
    (["results_dir="], "results_dir: expected a folder"),
    (["data=files", "~results_dir"], "results_dir: expected a value"),  # data.dir interpolates it too
    (["steps=${nope}"], "steps: expected a value that resolves"),
    ([f"{LONG_KEY}=1"], "kkkk"),
    ([f"+{LONG_KEY}=1"], "kkkk"),
    ([f"model.{LONG_KEY}=1"], "model.kkkk"),
    (["steps=1" + "0" * 5000], "steps: expected"),  # past Python's 4,300-digit int conversion
], ids=lambda v: v[:40] if isinstance(v, str) else " ".join(a[:40] for a in v))
def test_the_app_refuses_in_one_line_before_any_folder(args, start):
    line = refused_by_the_app(*args)
    assert line.startswith(f"bench: invalid config: {start}"), line
    assert len(line) < 600, "a long key or value is shortened"


def test_an_escaping_model_name_makes_no_folder(tmp_path):
    """Through `python -m bench`: the run folder was <results_dir>/<date>/<time>_single_../../.., i.e.
    <results_dir> itself, and Hydra made it (and wrote .hydra/ there) before the name was ever checked."""
    from conftest import run_bench

    proc = run_bench("model.name=../../..", results_dir=tmp_path / "results", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("bench: invalid config: model.name: expected one of"), proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_the_folder_names_hold_only_checked_values():
    """The run and sweep folders' names interpolate only the groups' names, which `bench.checks_shape` holds to
    their options' (no path separator can come in); results_dir is a path by design, checked non-empty."""
    import re

    import yaml

    import bench.__main__ as bench_main

    templates = [bench_main.COMMAND.run_name]
    for name in ("config", "comm"):
        hydra_cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())["hydra"]
        templates += [hydra_cfg["run"]["dir"], hydra_cfg["sweep"]["dir"], hydra_cfg["sweep"]["subdir"]]
    keys = {k for t in templates for k in re.findall(r"\$\{([^}:]+)\}", t)}
    allowed = {"results_dir", "hydra.job.num"} | {f"{group}.name" for group in ("strategy", "model", "data", "launch")}
    assert keys and keys <= allowed, keys - allowed


def test_a_relative_results_dir_is_where_bench_started_even_with_chdir(tmp_path, monkeypatch):
    """hydra.job.chdir=true moves the process into the run folder before the job runs: a relative results_dir
    (and data.dir under it) resolved there put runs.jsonl inside the run folder. It is resolved against
    hydra.runtime.cwd, where Hydra made the run folder from it (Hydra's to_absolute_path convention)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from bench import app

    started, run_dir = tmp_path / "start", tmp_path / "start" / "rel" / "run"
    run_dir.mkdir(parents=True)
    cfg = compose_config("hydra.job.chdir=true", "results_dir=rel", "data=files", hydra=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.cwd, cfg.hydra.runtime.output_dir = str(started), str(run_dir)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # put back after the test: no other test sees it
    HydraConfig.instance().set_config(cfg)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    monkeypatch.chdir(run_dir)  # what Hydra's run_job does with chdir=true
    seen = {}

    def run(plain, folder, results_file, overrides):
        seen.update(plain=plain, results_file=results_file)
        return app.JobResult([], app.LaunchOutcome("ok"), True)

    command = app.Command("bench", "config", "runs.jsonl", "x", prepare=lambda plain: plain, run=run,
                          empty_row=None, print_summary=lambda rows, path: None)
    assert app.run_job(command, job) == 0
    assert seen["results_file"] == started / "rel" / "runs.jsonl"
    assert seen["plain"]["results_dir"] == str(started / "rel")
    assert seen["plain"]["data"]["dir"] == str(started / "rel" / "datasets")


def test_a_valid_config_can_still_be_warned_about():
    from bench.checks import config_warnings

    cfg = compose_plain("precision=fp16", "device=cpu")
    validate(cfg)
    assert any("precision=fp16 on CPU" in w for w in config_warnings(cfg))
    assert config_warnings(compose_plain("precision=bf16", "device=cpu")) == []


def test_degrees_are_inferred_per_strategy():
    others = {"cp": 1, "ep": 1, "dp_replicate": 1}
    assert compose_plain("strategy=pipeline")["parallel"] == {"dp": 1, "tp": 1, "pp": -1, **others}
    assert compose_plain("strategy=tensor")["parallel"] == {"dp": 1, "tp": -1, "pp": 1, **others}


def test_launchers_fill_the_keys_they_derive(monkeypatch):
    cfg = compose_plain("launch=slurm", "launch.nodes=2", "launch.gpus_per_node=8", "strategy=ddp")
    validate(cfg)  # no GPU here: the ranks' GPUs are on the compute nodes, not checked on the login node
    assert (cfg["launch"]["nnodes"], cfg["launch"]["nproc"], cfg["device"]) == (2, 8, "cuda")
    for key, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    cfg = compose_plain("launch=inline", "strategy=ddp")
    validate(cfg)
    assert (cfg["launch"]["nnodes"], cfg["launch"]["nproc"]) == (2, 2)


# ------------------------------------------------------------------------------------------------ experiments


def sweep_jobs(name: str) -> list[list[str]]:
    """The jobs `python -m bench -m +experiment=<name>` launches (the basic sweeper's cartesian product)."""
    params = compose_config(f"+experiment={name}", hydra=True).hydra.sweeper.params
    axes = []
    for key, values in params.items():
        values = str(values)
        if values.startswith("glob("):  # a config group's options: glob(*) or glob(*,exclude=[...])
            values = ",".join(group_options(key))
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)]


def test_the_named_experiments_exist_and_are_selected_with_plus():
    assert {"smoke", "scaling", "weak_scaling", "strategies", "regression"} <= set(EXPERIMENTS)
    defaults = (CONF / "config.yaml").read_text().split("defaults:")[1].split("\n\n")[0]
    assert "experiment" not in defaults, "the experiment group is chosen with +experiment=..., not a default"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_sweep_composes_and_validates(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    jobs = sweep_jobs(name)
    assert jobs, "an experiment is a sweep: it needs hydra.sweeper.params"
    jobs = [job for job in jobs if not any(j.startswith("+repeat=") and j != "+repeat=0" for j in job)]  # alike
    runnable = 0
    for job in jobs:
        cfg = OmegaConf.to_container(compose_config(f"+experiment={name}", *job), resolve=True)
        try:
            validate(cfg)
            runnable += 1
        except ConfigError as exc:  # a combination this machine cannot run becomes a skipped row
            assert "launch.nproc" in str(exc), f"{job}: {exc}"
    assert runnable >= 2


def test_the_strategies_experiment_covers_every_strategy():
    strategies = {job for jobs in sweep_jobs("strategies") for job in jobs if job.startswith("strategy=")}
    assert strategies == {f"strategy={name}" for name in group_options("strategy")}


def test_smoke_sweep_is_small_enough_for_ci():
    jobs = sweep_jobs("smoke")
    assert len(jobs) <= 3
    for job in jobs:
        cfg = compose_config("+experiment=smoke", *job)
        assert cfg.steps <= 8 and cfg.launch.nproc <= 2


def test_profile_true_is_short_for_profile_enabled_beside_its_other_keys():
    from bench.app import expand_switches

    args = expand_switches(["profile=true", "profile.steps=2", "strategy=ddp", "-m", "profile=true,false"])
    assert args == ["profile.enabled=true", "profile.steps=2", "strategy=ddp", "-m", "profile.enabled=true,false"]
    cfg = compose_plain(*args[:3])
    validate(cfg)
    assert cfg["profile"] == {"enabled": True, "steps": 2, "memory": False}


# Meta's published parameter counts (the model cards), for the presets whose sizes come from their config.json.
PUBLISHED_PARAMETERS = {"llama3.1-405b": 405_853_388_800, "llama3-70b": 70_553_706_496}


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMETERS))
def test_a_big_presets_sizes_give_its_published_parameter_count(preset):
    """Built on the meta device with one and two decoder layers (a whole 126-layer build takes seconds), the
    layers counted: every layer of these decoders has the same shapes."""
    from bench.models import build_on_meta

    cfg = compose_plain(f"model={preset}")["model"]
    layers = cfg["config"]["num_hidden_layers"]

    def params(n: int) -> int:
        small = {**cfg, "config": {**cfg["config"], "num_hidden_layers": n}}
        return sum(p.numel() for p in build_on_meta(small).parameters())

    one, two = params(1), params(2)
    assert one + (layers - 1) * (two - one) == PUBLISHED_PARAMETERS[preset]
