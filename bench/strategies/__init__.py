"""Strategies: `bench/strategies/<name>.py` defines `apply(model, topo, cfg) -> Parallel`.

A strategy wraps the model (and, where it must, the optimizer and the step); the train loop only
ever calls `parallel.forward_backward(x, y)` and `parallel.optimizer.step()`, whatever runs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.topology import Topology


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every prediction (classes for the MLP, next tokens for the GPT)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


@dataclass
class Parallel:
    module: nn.Module  # the model as the strategy wrapped it
    optimizer: torch.optim.Optimizer
    holds_loss: bool = True  # whether this rank's forward_backward returns the loss of its data shard

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(self.module(x), y)
        loss.backward()
        return loss.detach()


def apply_strategy(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    module = importlib.import_module(f"bench.strategies.{cfg['strategy']['name']}")
    return module.apply(model, topo, cfg)
