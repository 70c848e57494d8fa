"""Multi-layer perceptron classifier: features -> hidden blocks -> class logits."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, layers: int, classes: int):
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(cfg: dict) -> MLP:
    return MLP(cfg["in_features"], cfg["hidden"], cfg["layers"], cfg["classes"])


def synthetic_batch(cfg: dict, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features and uniform class labels."""
    x = torch.randn(batch_size, cfg["in_features"], generator=gen)
    y = torch.randint(0, cfg["classes"], (batch_size,), generator=gen)
    return x, y


def tokens_per_sample(cfg: dict) -> int | None:
    return None
