"""Models: `build_model(cfg)` returns an nn.Module whose forward maps inputs to logits.

Every model keeps its repeated layers in `model.blocks` (an nn.ModuleList) so that strategies
can shard, wrap or split it at block boundaries. A new model is one file here plus one config.
"""

from __future__ import annotations

import importlib

from torch import nn


def build_model(model_cfg: dict) -> nn.Module:
    return model_module(model_cfg).build(model_cfg)


def model_module(model_cfg: dict):
    """The model's own module: `build`, `synthetic_batch(cfg, batch_size, generator)`, `tokens_per_sample`."""
    return importlib.import_module(f"bench.models.{model_cfg['name']}")
