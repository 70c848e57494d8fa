"""The written contracts (docstrings of `bench.strategies`, `bench.models`, `bench.data`, `bench.launch`), checked
for every module of each kind. The config tree is the registry: every option of a group is one module."""

import difflib
import inspect

import pytest
import torch
from torch import nn

from bench import group_options
from bench.checks import value_at
from bench.data import data_module, data_names
from bench.launch import NAMES as LAUNCHERS
from bench.models import (
    Split,
    build_on_meta,
    loss_fn,
    materialize_model,
    model_blocks,
    model_module,
    model_names,
    model_spec,
)
from bench.strategies import DEFAULT_DEGREES, PARITY_KINDS, strategy_module, strategy_names, strategy_spec
from conftest import REPO, compose_plain

STRATEGY_NAMES = {"apply", "check", "DEGREES", "PARITY", "SINGLE_PROCESS"}
MODEL_NAMES = {"build", "check", "synthetic_batch", "tokens_per_sample", "BLOCKS", "BLOCKS_KEY", "PIPELINE_SPLIT",
               "tp_plan", "tp_split_sizes", "SEQUENCE_PARALLEL", "model_flops_per_sample", "FLOPS_CONVENTION",
               "INIT_STD"}


def misspelt(module, contract: set[str]) -> dict[str, list[str]]:
    """Public names of the module that look like a contract name but are not one: a misspelt optional hook
    (`PARTIY`, `tp_plans`) would silently fall back to its default."""
    names = [n for n in vars(module) if not n.startswith("_") and n not in contract]
    close = {n: difflib.get_close_matches(n, contract, n=1, cutoff=0.8) for n in names}
    return {n: match for n, match in close.items() if match}


# --------------------------------------------------------------------------------------------- strategies


@pytest.mark.parametrize("name", strategy_names())
def test_every_strategy_meets_the_contract(name):
    module = strategy_module(name)
    spec = strategy_spec(name)
    assert list(inspect.signature(module.apply).parameters) == ["model", "topo", "cfg"]
    assert callable(spec.check) and len(inspect.signature(spec.check).parameters) == 1
    assert spec.degrees <= {"dp", "tp", "pp"} and spec.degrees
    assert spec.parity in PARITY_KINDS
    assert isinstance(spec.single_process, bool)
    assert not misspelt(module, STRATEGY_NAMES), f"bench/strategies/{name}.py"
    cfg = compose_plain(f"strategy={name}")
    assert cfg["strategy"]["name"] == name, "conf/strategy/<name>.yaml sets strategy.name to its own name"


def test_strategy_defaults_are_what_the_contract_says(tmp_path, monkeypatch):
    """A strategy that defines only `apply` gets the documented defaults."""
    (tmp_path / "bench_test_minimal_strategy.py").write_text("def apply(model, topo, cfg):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("bench.strategies.strategy_module", lambda name: __import__(name))
    spec = strategy_spec("bench_test_minimal_strategy")
    assert (spec.degrees, spec.parity, spec.single_process) == (DEFAULT_DEGREES, "data", False)
    assert spec.check({}) is None


def test_a_misspelt_hook_is_caught():
    class Module:
        PARTIY = "model"
        SCHEDULES = ("gpipe",)

    assert misspelt(Module, STRATEGY_NAMES) == {"PARTIY": ["PARITY"]}


def test_one_process_strategies_say_so():
    assert {n for n in strategy_names() if strategy_spec(n).single_process} == {"single", "dataparallel",
                                                                                 "modelparallel"}


# ------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", model_names())
def test_every_model_meets_the_contract(name):
    cfg = compose_plain(f"model={name}")["model"]
    spec = model_spec(cfg)
    assert not misspelt(model_module(name), MODEL_NAMES), f"bench/models/{name}.py"

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

    small = materialize_model(build_on_meta(_small(cfg)), {"model": _small(cfg), "seed": 0}, "cpu")
    xs, ys = spec.synthetic_batch(_small(cfg), 2, torch.Generator().manual_seed(0))
    loss = loss_fn(small(xs), ys)
    assert loss.dim() == 0 and torch.isfinite(loss)

    if spec.pipeline_split is not None:
        assert isinstance(spec.pipeline_split, Split)
        for path in spec.pipeline_split.pre + spec.pipeline_split.post + spec.pipeline_split.shared:
            meta.get_submodule(path)  # raises if the model has no such submodule
    if spec.tp_plan is not None:
        plan = spec.tp_plan(cfg, False)
        for path in plan:
            meta.get_submodule(path)
        for key, size in spec.tp_split_sizes(cfg).items():
            assert key.startswith("model.") and isinstance(size, int), "a config key to name in errors, its size"
        if spec.sequence_parallel:
            assert spec.tp_plan(cfg, True)


def _small(cfg: dict) -> dict:
    """The model's default config (presets are GPU-sized): small enough to run a forward here."""
    return compose_plain(f"model={cfg['name']}")["model"]


def test_presets_share_their_models_module():
    for option in group_options("model"):
        assert compose_plain(f"model={option}")["model"]["name"] in model_names()


# ----------------------------------------------------------------------------------- data sources, launchers


@pytest.mark.parametrize("name", data_names())
def test_every_data_source_meets_the_contract(name):
    module = data_module(name)
    assert list(inspect.signature(module.batches).parameters) == ["cfg", "topo"]
    for hook in ("check", "prepare"):
        assert not hasattr(module, hook) or len(inspect.signature(getattr(module, hook)).parameters) == 1
    assert compose_plain(f"data={name}")["data"]["name"] == name


def test_every_launcher_in_conf_has_its_module():
    assert sorted(LAUNCHERS) == group_options("launch")
    for name in LAUNCHERS:
        module = __import__(f"bench.launch.{name}", fromlist=["launch"])
        assert list(inspect.signature(module.launch).parameters) == ["cfg", "run_dir", "worker"]


def test_every_module_reads_on_a_few_screens():
    """The house rule: no module under bench/ beyond ~300 lines (split it by role instead)."""
    lines = {p.relative_to(REPO): len(p.read_text().splitlines()) for p in (REPO / "bench").rglob("*.py")}
    assert not {path: n for path, n in lines.items() if n > 300}
