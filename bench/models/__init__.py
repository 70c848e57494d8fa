"""Models: what is trained. The contract, checked for every model by `tests/test_contracts.py`:

A model is `bench/models/<name>.py` plus `conf/model/<name>.yaml` (`name: <name>` and its sizes; presets are
`conf/model/<name>-<size>.yaml` with the same `name`). The module defines

required
    build(cfg) -> nn.Module
        The model, on the current default device (a meta-device build must work). Its forward maps a batch of
        inputs to logits; bench's loss is `loss_fn(logits, targets)` below, for every model.
    synthetic_batch(cfg, batch_size, generator) -> (inputs, targets)
        A batch drawn from `generator`, on the CPU: what data=synthetic feeds and data=files writes to disk.
optional (default)
    check(cfg) -> None                      (accept everything)
        Refuse, with `bench.checks.reject`, sizes the model cannot be built with (cfg is the whole config).
    tokens_per_sample(cfg) -> int | None    (None: no tokens/s)
    BLOCKS: str                             ("blocks")
        The attribute path of the nn.ModuleList of repeated blocks ("blocks", or "model.layers" in a Hugging
        Face decoder): FSDP shards each block, activation checkpointing and compile wrap each, pipeline and
        modelparallel cut between them.
    BLOCKS_KEY: str | None                  (None)
        The config key that sets the number of blocks (e.g. "model.n_layers"), named in error messages.
    PIPELINE_SPLIT: Split | None            (None: strategy=pipeline and modelparallel refuse the model)
        How the forward runs around the blocks; see `Split`.
    tp_plan(cfg, sequence_parallel) -> {module path: ParallelStyle}   (absent: strategy=tensor refuses it)
        The tensor-parallel plan for DTensor's `parallelize_module`.
    tp_split_sizes(cfg) -> {config key: size}   ({})
        The sizes the plan splits over the tp ranks: each must divide by the tensor-parallel degree.
    SEQUENCE_PARALLEL: bool                 (False)
        Whether `tp_plan(cfg, sequence_parallel=True)` exists (a sequence dimension to split).
    model_flops_per_sample(cfg) -> float and FLOPS_CONVENTION: str    (absent: FlopCounterMode's count)
        The model FLOPs of one sample's forward + backward by an analytic convention the string states (what
        MFU divides); see `bench.measure.flops`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bench import group_options


class Split(NamedTuple):
    """How a model's forward runs around its blocks, so that the model can be cut between them.

    `pre` and `post` are the attribute paths of the submodules before the blocks (held by the first stage) and
    after them (held by the last); `embed(m, inputs)` and `head(m, hidden)` are the code that uses them, called
    with a module holding those submodules under the same paths: the whole model or one stage. The model's own
    forward should call the same functions, so the split cannot drift from it. Blocks whose call needs more
    than the hidden states (a Hugging Face decoder layer takes rotary position embeddings) give
    `run_block(m, block, hidden)`, and `shared`, the paths of parameter-free modules every stage holds (its
    rotary embedding)."""

    pre: tuple[str, ...]
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    post: tuple[str, ...]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    run_block: Callable[[nn.Module, nn.Module, torch.Tensor], torch.Tensor] | None = None
    shared: tuple[str, ...] = ()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every prediction (classes for the MLP/CNN, next tokens for the GPT)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


@dataclass(frozen=True)
class ModelSpec:
    """A model module read through its contract, defaults filled in."""

    name: str
    build: Callable[[dict], nn.Module]
    check: Callable[[dict], None]
    synthetic_batch: Callable
    tokens_per_sample: Callable[[dict], int | None]
    blocks: str
    blocks_key: str | None
    pipeline_split: Split | None
    tp_plan: Callable | None
    tp_split_sizes: Callable[[dict], dict[str, int]]
    sequence_parallel: bool
    model_flops_per_sample: Callable[[dict], float] | None
    flops_convention: str | None


def model_module(name: str) -> ModuleType:
    return importlib.import_module(f"bench.models.{name}")


def model_spec(model_cfg: dict) -> ModelSpec:
    module = model_module(model_cfg["name"])
    return ModelSpec(
        name=model_cfg["name"],
        build=module.build,
        check=getattr(module, "check", lambda cfg: None),
        synthetic_batch=module.synthetic_batch,
        tokens_per_sample=getattr(module, "tokens_per_sample", lambda cfg: None),
        blocks=getattr(module, "BLOCKS", "blocks"),
        blocks_key=getattr(module, "BLOCKS_KEY", None),
        pipeline_split=getattr(module, "PIPELINE_SPLIT", None),
        tp_plan=getattr(module, "tp_plan", None),
        tp_split_sizes=getattr(module, "tp_split_sizes", lambda cfg: {}),
        sequence_parallel=getattr(module, "SEQUENCE_PARALLEL", False),
        model_flops_per_sample=getattr(module, "model_flops_per_sample", None),
        flops_convention=getattr(module, "FLOPS_CONVENTION", None),
    )


def model_names() -> list[str]:
    """Every model module: the `name` of each option of the config group `model` (presets share theirs)."""
    return sorted({option.split("-")[0] for option in group_options("model")})


def build_model(model_cfg: dict) -> nn.Module:
    return model_spec(model_cfg).build(model_cfg)


def model_blocks(model: nn.Module, model_cfg: dict) -> nn.ModuleList:
    """The model's repeated blocks (its `BLOCKS` path)."""
    return model.get_submodule(model_spec(model_cfg).blocks)


def count_blocks(model_cfg: dict) -> int:
    """The model's number of blocks, from a build on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return len(model_blocks(build_model(model_cfg), model_cfg))
