"""The written contracts (docstrings of `bench.strategies`, `bench.models`, `bench.data`, `bench.launch`), checked
for every module of each kind: every hook, with its default where the module leaves it out. The config tree is the
registry: every option of a group is one module. And the rule that makes a strategy or launcher one file: no
module outside `bench/strategies/` and `bench/launch/` names one."""

import ast
import difflib
import inspect

import pytest
import torch
from torch import nn

from bench import group_options
from bench.data import data_module, data_names
from bench.errors import value_at
from bench.launch import CONTRACT as LAUNCHER_CONTRACT
from bench.launch import launcher_module, launcher_names, launcher_spec
from bench.models import (
    NEEDS,
    ModelSizes,
    Split,
    build_on_meta,
    loss_fn,
    model_blocks,
    model_module,
    model_names,
    model_spec,
)
from bench.parallel.topology import Degrees
from bench.run import prepare
from bench.strategies import CONTRACT as STRATEGY_CONTRACT
from bench.strategies import MEMORY_KINDS, PARITY_KINDS, strategy_module, strategy_names, strategy_spec
from conftest import REPO, compose_plain, materialized

MODEL_CONTRACT = {"build", "check", "synthetic_batch", "tokens_per_sample", "BLOCKS", "BLOCKS_KEY", "PIPELINE_SPLIT",
                  "tp_plan", "tp_split_sizes", "SEQUENCE_PARALLEL", "model_flops_per_sample", "FLOPS_CONVENTION",
                  "INIT_STD"}
SIZES = ModelSizes(params=1000, param_tensors=4, boundary_bytes_per_sample=64.0)


def misspelt(module, contract: set[str]) -> dict[str, list[str]]:
    """Public names of the module that look like a contract name but are not one: a misspelt optional hook
    (`PARTIY`, `tp_plans`) would silently fall back to its default."""
    own = getattr(module, "__name__", None)
    names = [n for n, v in vars(module).items() if not n.startswith("_") and n not in contract
             and getattr(v, "__module__", own) == own]  # imported helpers are not the module's hooks
    close = {n: difflib.get_close_matches(n, contract, n=1, cutoff=0.8) for n in names}
    return {n: match for n, match in close.items() if match}


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


# --------------------------------------------------------------------------------------------- strategies


def run_of(name: str):
    """The strategy's run at its own defaults on 2 ranks (1 for a strategy of one process)."""
    nproc = 1 if strategy_spec(name).single_process else 2
    return prepare(compose_plain(f"strategy={name}", "model=gpt", f"launch.nproc={nproc}", "force=true"))


@pytest.mark.parametrize("name", strategy_names())
def test_every_strategy_meets_the_contract(name):
    module, spec = strategy_module(name), strategy_spec(name)
    assert params(module.apply) == ["model", "topo", "run"]
    assert params(spec.check) == ["cfg"]
    assert spec.degrees <= {"dp", "dp_replicate", "cp", "ep", "tp", "pp"} and spec.degrees
    assert spec.parity in PARITY_KINDS
    assert isinstance(spec.single_process, bool) and isinstance(spec.overlap, bool)
    assert not misspelt(module, STRATEGY_CONTRACT), f"bench/strategies/{name}.py"
    cfg = compose_plain(f"strategy={name}")
    assert cfg["strategy"]["name"] == name, "conf/strategy/<name>.yaml sets strategy.name to its own name"

    run = run_of(name)
    assert spec.model_needs(run.config) <= set(NEEDS)
    for world in (1, 2, 4):
        assert all(isinstance(d, Degrees) and d.world == world for d in spec.layouts(world, None))
    memory = spec.memory(run)
    assert memory.how in MEMORY_KINDS and (memory.how != "not predicted" or memory.reason)
    for collective in spec.collectives(run, SIZES):
        assert set(collective) == {"collective", "ranks", "span", "calls", "bytes"}
    assert spec.bubble(run) >= 0
    assert isinstance(spec.batch_unit(run), int) and spec.batch_unit(run) >= 1


def test_strategy_defaults_are_what_the_contract_says(tmp_path, monkeypatch):
    """A strategy that defines only `apply` gets the documented defaults."""
    run = run_of("ddp")
    (tmp_path / "bench_test_minimal_strategy.py").write_text("def apply(model, topo, run):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("bench.strategies.strategy_module", lambda name: __import__(name))
    spec = strategy_spec("bench_test_minimal_strategy")
    assert (spec.degrees, spec.parity, spec.single_process, spec.overlap) == ({"dp"}, "data", False, False)
    assert spec.check({}) is None and spec.model_needs({}) == frozenset()
    assert spec.layouts(2, None) == [], "not planned"
    assert spec.memory(run).how == "simulated" and spec.collectives(run, SIZES) == []
    assert (spec.bubble(run), spec.batch_unit(run)) == (0.0, 1)


def test_a_misspelt_hook_is_caught():
    class Module:
        PARTIY = "model"
        SCHEDULES = ("gpipe",)

    assert misspelt(Module, STRATEGY_CONTRACT) == {"PARTIY": ["PARITY"]}


def test_the_baseline_is_one_process():
    assert strategy_spec("single").single_process and strategy_spec("single").layouts(1, None) == [Degrees()]


# ------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", model_names())
def test_every_model_meets_the_contract(name):
    cfg = compose_plain(f"model={name}")["model"]
    spec = model_spec(cfg)
    assert not misspelt(model_module(name), MODEL_CONTRACT), f"bench/models/{name}.py"
    assert params(spec.check) == ["cfg", "needs"]

    meta = build_on_meta(cfg)  # the contract: parameters on the meta device, nothing allocated
    assert all(p.is_meta for p in meta.parameters())
    blocks = model_blocks(meta, cfg)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) >= 1
    if spec.blocks_key:
        assert spec.blocks_key.startswith("model.")
        assert value_at({"model": cfg}, spec.blocks_key) == len(blocks), f"{spec.blocks_key} sets the blocks"
    assert spec.init_std is None or spec.init_std > 0

    x, y = spec.synthetic_batch(cfg, 3, torch.Generator().manual_seed(0))
    assert x.device.type == "cpu" and len(x) == len(y) == 3
    tokens = spec.tokens_per_sample(cfg)
    assert tokens is None or (isinstance(tokens, int) and tokens > 0)

    small = compose_plain(f"model={cfg['name']}")["model"]  # the model's default config (presets are GPU-sized)
    xs, ys = spec.synthetic_batch(small, 2, torch.Generator().manual_seed(0))
    loss = loss_fn(materialized(small)(xs), ys)
    assert loss.dim() == 0 and torch.isfinite(loss)

    if spec.pipeline_split is not None:
        assert isinstance(spec.pipeline_split, Split)
        for path in spec.pipeline_split.pre + spec.pipeline_split.post:
            meta.get_submodule(path)  # raises if the model has no such submodule
        assert spec.pipeline_split.by_forward == (spec.pipeline_split.input_like is not None)
    if spec.small_config is not None:
        assert model_spec(spec.small_config(small, 2)).blocks_of(build_on_meta(spec.small_config(small, 2))), "2 blocks"
    if spec.tp_plan is not None:
        plan = spec.tp_plan(cfg, False)
        for path in plan:
            meta.get_submodule(path)
        for key, size in spec.tp_split_sizes(cfg).items():
            assert key.startswith("model.") and isinstance(size, int), "a config key to name in errors, its size"
        if spec.sequence_parallel:
            assert spec.tp_plan(cfg, True)


def test_presets_share_their_models_module():
    for option in group_options("model"):
        assert compose_plain(f"model={option}")["model"]["name"] in model_names()


# ----------------------------------------------------------------------------------- data sources, launchers


@pytest.mark.parametrize("name", data_names())
def test_every_data_source_meets_the_contract(name):
    module = data_module(name)
    assert params(module.batches) == ["run", "topo"]
    for hook in ("check", "prepare"):
        assert not hasattr(module, hook) or len(params(getattr(module, hook))) == 1
    assert compose_plain(f"data={name}")["data"]["name"] == name


@pytest.mark.parametrize("name", launcher_names())
def test_every_launcher_meets_the_contract(name):
    module, spec = launcher_module(name), launcher_spec(name)
    assert params(module.launch) == ["cfg", "run_dir", "worker"]
    assert params(spec.check) == ["cfg"] and params(spec.check_here) == ["cfg"]
    assert all(isinstance(flag, bool) for flag in (spec.runs_here, spec.shares_run_folder, spec.rank_in_controller))
    assert spec.run_id is None or params(spec.run_id) == ["args", "env"]
    assert not misspelt(module, LAUNCHER_CONTRACT), f"bench/launch/{name}.py"
    assert compose_plain(f"launch={name}")["launch"]["name"] == name


# ----------------------------------------------------------------------------------- the house rules


def test_every_module_reads_on_a_few_screens():
    """No module under bench/ beyond ~300 lines (split it by role instead)."""
    lines = {p.relative_to(REPO): len(p.read_text().splitlines()) for p in (REPO / "bench").rglob("*.py")}
    assert not {path: n for path, n in lines.items() if n > 300}


OWNERS = ("strategies", "launch")  # the folders whose modules may name a strategy or a launcher


def names_in_code(path, names: set[str]) -> list[str]:
    """Where a module's code (not its docstrings) holds one of `names` as a string (to compare with, key a dict
    by, list), or says `strategy=<name>` / `launch=<name>` in a message: "file:line 'name'"."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in sorted(ast.walk(tree), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0))):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docstrings:
            continue
        words = {node.value} | {word.split("=", 1)[1].rstrip(",.;:)`'") for word in node.value.split()
                                if word.startswith(("strategy=", "launch="))}
        for name in words & names:
            found.append(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{node.lineno} {name!r}")
    return found


def test_no_module_outside_the_strategies_and_launchers_names_one():
    """Only the baseline `single` may be named. Also a strategy or launcher name in a string compared, looked up
    or printed (`strategy=ddp`) counts: everything the rest of bench needs of one comes from its spec."""
    names = (set(strategy_names()) - {"single"}) | set(launcher_names())
    modules = [p for p in (REPO / "bench").rglob("*.py") if p.relative_to(REPO / "bench").parts[0] not in OWNERS]
    found = [hit for path in modules for hit in names_in_code(path, names)]
    assert not found, found


def test_the_names_rule_sees_a_comparison_and_a_message_but_not_a_docstring(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""ddp in a docstring is fine."""\nok = cfg["name"] in ("ddp", "x")\n'
                      'hint = "or strategy=fsdp."\n')
    assert [hit.split(" ", 1)[1] for hit in names_in_code(module, {"ddp", "fsdp"})] == ["'ddp'", "'fsdp'"]
