"""Models: what is trained. The contract, checked for every model by `tests/unit/test_contracts.py`:

A model is `bench/models/<name>.py` plus `conf/model/<name>.yaml` (`name: <name>` and its sizes). Presets are
more files in `conf/model/` with the same `name` (and a `preset:` naming them in the results: `llama3-8b.yaml`
holds `name: hf`, `preset: llama3-8b`). The module defines

required
    build(cfg) -> nn.Module
        The model. Ranks build it under `parameters_on_meta` (`bench.models.init`): parameters on the meta
        device, buffers real; bench fills the parameters by its own rule once the strategy has placed them.
        Its forward maps a batch of inputs to logits (or an output with `.logits`, as Hugging Face models
        return); bench's loss is `loss_fn(logits, targets)` below, for every model.
    synthetic_batch(cfg, batch_size, generator) -> (inputs, targets)
        A batch drawn from `generator`, on the CPU: what data=synthetic feeds and data=files writes to disk.
optional (default)
    check(cfg, needs) -> None               (accept everything)
        Refuse, with `bench.errors.reject`, sizes the model cannot be built with (cfg is the whole config), and
        what the strategy needs of it (`needs`, a set of `NEEDS`) where this model cannot give it.
    tokens_per_sample(cfg) -> int | None    (None: no tokens/s)
    BLOCKS: str                             ("blocks")
        The attribute path of the nn.ModuleList of repeated blocks ("blocks", or "model.layers" in a Hugging
        Face decoder): FSDP shards each block, activation checkpointing and compile wrap each, pipeline and
        modelparallel cut between them.
    BLOCKS_KEY: str | None                  (None)
        The config key that sets the number of blocks (e.g. "model.n_layers"), named in error messages.
    with_blocks(cfg, n_blocks) -> model config   (BLOCKS_KEY set to n_blocks; absent BLOCKS_KEY: none)
        The same model, every width unchanged, with `n_blocks` blocks: the planner simulates a deep model at
        two small depths and extrapolates to its own (`bench.plan.memory`).
    PIPELINE_SPLIT: Split | None            (None: a strategy that needs "pipeline_split" refuses the model)
        How the forward runs around the blocks; see `Split`.
    small_config(cfg, n_blocks) -> model config   (absent: the model itself, checked when small)
        The same architecture small enough to run on a CPU in a moment, with `n_blocks` blocks: where a
        pipeline's stages are checked against the model's forward before a run (`bench.strategies.stages`).
    tp_plan(cfg, sequence_parallel) -> {module path: ParallelStyle}   (absent: one that needs "tp_plan" refuses it)
        The tensor-parallel plan for DTensor's `parallelize_module`.
    tp_split_sizes(cfg) -> {config key: size}   ({})
        The sizes the plan splits over the tp ranks: each must divide by the tensor-parallel degree.
    context_parallel(model, context) -> None   (absent: a strategy that needs "context_parallel" refuses it)
        Run on a rank's share of each sequence, in place: positions `context.positions(tokens, device)`, every
        attention `context.attention(q, k, v)` (`bench.parallel.context.ContextGroup`); the batch comes split.
    SEQUENCE_PARALLEL: bool                 (False)
        Whether `tp_plan(cfg, sequence_parallel=True)` exists (a sequence dimension to split).
    model_flops_per_sample(cfg, causal=False) -> float and FLOPS_CONVENTION: str   (absent: FlopCounterMode's)
        The model FLOPs of one sample's forward + backward by the analytic convention the string states (what
        MFU divides: the field's, attention over the full T x T square); `causal=True`: the causal count, half
        the scores (the row's model_flops_causal_per_step); see `bench.measure.flops`.
    INIT_STD: float | None                  (None: U(+-1/sqrt(fan_in)) for matrices)
        The standard deviation of the normal distribution every matrix is drawn from (`bench.models.init`).

Each CONSTANT may also be a function of the model config returning it (a Hugging Face model's blocks and
split depend on its architecture): `model_spec` calls it.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch
import yaml
from torch import nn

from bench import conf_dir, group_options
from bench.models.outputs import logits_of, loss_fn, token_batch  # noqa: F401 (bench.models' own names)

# What a strategy may need of a model (its MODEL_NEEDS): a model refuses by these, never by a strategy's name.
NEEDS = {
    "tp_plan": "a tensor-parallel plan (tp_plan) whose split sizes divide by the tp degree",
    "sharded_tp_plan": "a tensor-parallel plan that holds under data-parallel sharding of its parameters (FSDP x TP)",
    "pipeline_split": "a cut between its blocks (PIPELINE_SPLIT) with no weight shared by the first and last stage",
    "context_parallel": "attention over a sequence split across ranks (context_parallel)",
    "experts": "mixture-of-experts layers of stacked expert weights (transformers' experts interface)",
}

CONSTANTS = {"BLOCKS": "blocks", "BLOCKS_KEY": None, "PIPELINE_SPLIT": None, "SEQUENCE_PARALLEL": False,
             "FLOPS_CONVENTION": None, "INIT_STD": None}  # name -> default


class Split(NamedTuple):
    """How a model is cut between its blocks (`pipeline`, `modelparallel`): `pre` and `post` are the attribute
    paths of the submodules before the blocks (held by the first stage) and after them (held by the last).

    Two ways to run a stage:
    - the model's own forward (`embed` and `head` None, a Hugging Face model's): each stage calls the whole
      model's forward, holding only its own blocks; a later stage feeds it `input_like(received)` (an input of
      the right shape whose values are never used: its `pre` modules stand in with zeros), swaps in the
      activation it received at its first block, and stops at its last. Whatever the forward does around the
      blocks (masks, multipliers, soft-caps, per-layer rotary embeddings) is kept;
    - by hand: `embed(m, inputs)` and `head(m, hidden)` run the code before and after the blocks, called with a
      module holding `pre` / `post` under the same paths (the whole model, or one stage); the blocks are called
      with the hidden states alone. The model's forward should call the same functions, so the split cannot
      drift from it (bench's own models do), else bench checks that it reproduces the forward
      (`bench.strategies.stages.check_split`)."""

    pre: tuple[str, ...]
    post: tuple[str, ...]
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    input_like: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def by_forward(self) -> bool:
        return self.embed is None and self.head is None


@dataclass(frozen=True)
class ModelSpec:
    """A model module read through its contract, defaults filled in."""

    name: str
    build: Callable[[dict], nn.Module]
    check: Callable[[dict, frozenset[str]], None]
    synthetic_batch: Callable
    tokens_per_sample: Callable[[dict], int | None]
    blocks: str
    blocks_key: str | None
    pipeline_split: Split | None
    small_config: Callable[[dict, int], dict] | None
    with_blocks: Callable[[dict, int], dict] | None
    tp_plan: Callable | None
    tp_split_sizes: Callable[[dict], dict[str, int]]
    context_parallel: Callable | None
    sequence_parallel: bool
    model_flops_per_sample: Callable[..., float] | None
    flops_convention: str | None
    init_std: float | None

    def blocks_of(self, model: nn.Module) -> nn.ModuleList:
        """The model's repeated blocks (its `BLOCKS` path)."""
        return model.get_submodule(self.blocks)

    def depth(self, model_cfg: dict) -> int:
        """How many blocks the model has."""
        return len(self.blocks_of(meta_instance(model_cfg)))


def model_module(name: str) -> ModuleType:
    return importlib.import_module(f"bench.models.{name}")


def model_spec(model_cfg: dict) -> ModelSpec:
    key = json.dumps(model_cfg, sort_keys=True, default=str)
    if key not in _SPECS:
        _SPECS[key] = _read_spec(model_cfg)
    return _SPECS[key]


_SPECS: dict[str, ModelSpec] = {}  # a constant may need a meta build of the model: read each config once


def _accept(cfg: dict, needs: frozenset[str]) -> None:
    return None


def _read_spec(model_cfg: dict) -> ModelSpec:
    module = model_module(model_cfg["name"])
    constants = {}
    for name, default in CONSTANTS.items():
        value = getattr(module, name, default)
        constants[name] = value(model_cfg) if callable(value) and not isinstance(value, Split) else value
    return ModelSpec(
        name=model_cfg["name"],
        build=module.build,
        check=getattr(module, "check", _accept),
        synthetic_batch=module.synthetic_batch,
        tokens_per_sample=getattr(module, "tokens_per_sample", lambda cfg: None),
        blocks=constants["BLOCKS"],
        blocks_key=constants["BLOCKS_KEY"],
        pipeline_split=constants["PIPELINE_SPLIT"],
        small_config=getattr(module, "small_config", None),
        with_blocks=getattr(module, "with_blocks", None) or _setting(constants["BLOCKS_KEY"]),
        tp_plan=getattr(module, "tp_plan", None),
        tp_split_sizes=getattr(module, "tp_split_sizes", lambda cfg: {}),
        context_parallel=getattr(module, "context_parallel", None),
        sequence_parallel=constants["SEQUENCE_PARALLEL"],
        model_flops_per_sample=getattr(module, "model_flops_per_sample", None),
        flops_convention=constants["FLOPS_CONVENTION"],
        init_std=constants["INIT_STD"],
    )


def _setting(blocks_key: str | None) -> Callable[[dict, int], dict] | None:
    """`with_blocks` by default: the model config with its BLOCKS_KEY (under `model.`) set."""
    if not blocks_key or not blocks_key.startswith("model."):
        return None
    *parents, leaf = blocks_key.split(".")[1:]

    def with_blocks(model_cfg: dict, n_blocks: int) -> dict:
        out = copy.deepcopy(model_cfg)
        functools.reduce(dict.__getitem__, parents, out)[leaf] = n_blocks
        return out

    return with_blocks


def check_model(cfg: dict, needs: frozenset[str] = frozenset()) -> None:
    """The model's own `check`, called first (a constant may need to build the model), with what the run's
    strategy needs of it."""
    getattr(model_module(cfg["model"]["name"]), "check", _accept)(cfg, frozenset(needs))


def model_names() -> list[str]:
    """Every model module: the `name` of each option of the config group `model` (presets share theirs)."""
    return sorted({yaml.safe_load((conf_dir() / "model" / f"{option}.yaml").read_text())["name"]
                   for option in group_options("model")})


def model_label(model_cfg: dict) -> str:
    """What the results call the model: its preset (`llama3-8b`), else its module's name."""
    return model_cfg.get("preset") or model_cfg["name"]


def build_model(model_cfg: dict) -> nn.Module:
    return model_spec(model_cfg).build(model_cfg)


def build_on_meta(model_cfg: dict) -> nn.Module:
    """The model with its parameters on the meta device (no memory, nothing initialised), buffers real: a copy
    of `meta_instance`, which the strategy may cut or wrap. Made outside any fake-tensor mode (a simulation
    converts it when it materialises it)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from bench.models.init import parameters_on_meta

    with unset_fake_temporarily():
        model = meta_instance(model_cfg)
        try:
            return copy.deepcopy(model)  # meta parameters copy for nothing; the buffers are copied
        except Exception:  # a module holding what cannot be copied (a lock, a thread): built again
            with parameters_on_meta():
                return build_model(model_cfg)


def meta_instance(model_cfg: dict) -> nn.Module:
    """The model on the meta device, built once per config and process, for reading its facts (blocks, plans,
    sizes): never to be changed. A user's constructor runs once here, not once per question asked of it."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from bench.models.init import parameters_on_meta

    key = json.dumps(model_cfg, sort_keys=True, default=str)
    if key not in _META:
        with parameters_on_meta(), unset_fake_temporarily():
            _META[key] = model_module(model_cfg["name"]).build(model_cfg)
    return _META[key]


_META: dict[str, nn.Module] = {}


def model_blocks(model: nn.Module, model_cfg: dict) -> nn.ModuleList:
    """The model's repeated blocks (its `BLOCKS` path)."""
    return model_spec(model_cfg).blocks_of(model)


def count_blocks(model_cfg: dict) -> int:
    """The model's number of blocks, from its build on the meta device (no memory, no initialisation cost)."""
    return len(model_blocks(meta_instance(model_cfg), model_cfg))


@dataclass(frozen=True)
class ModelSizes:
    """What the planner counts a strategy's collectives from (`bench.strategies`' `collectives` hook)."""

    params: int  # trainable parameters
    param_tensors: int  # trainable parameter tensors
    boundary_bytes_per_sample: float  # the largest activation a block hands the next, per sample


def model_sizes(model_cfg: dict) -> ModelSizes:
    """The model's sizes, from the model built on fake tensors and run forward on one sample: nothing is
    allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_leaves

    x, _ = model_spec(model_cfg).synthetic_batch(model_cfg, 1, torch.Generator().manual_seed(0))
    sent: list[float] = []

    def output_bytes(_module, _inputs, out) -> None:
        tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        sent.append(float(sum(t.numel() * t.element_size() for t in tensors)))

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model = build_model(model_cfg)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for block in model_blocks(model, model_cfg):
            block.register_forward_hook(output_bytes)
        with torch.no_grad():
            model(mode.from_tensor(x))
    return ModelSizes(sum(p.numel() for p in trainable), len(trainable), max(sent, default=0.0))

