"""Multi-layer perceptron classifier: features -> hidden blocks -> class logits."""

from __future__ import annotations

import torch
from torch import nn

from bench.models import Split


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
        x = embed(self, x)
        for block in self.blocks:
            x = block(x)
        return logits(self, x)


def embed(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input layer (`m`: the model, or the pipeline stage that holds it)."""
    return torch.relu(m.inp(x))


def logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.head(x)


def check(cfg: dict, needs: frozenset[str]) -> None:
    from bench.errors import positive_int

    for key in ("in_features", "hidden", "layers", "classes"):
        positive_int(cfg, f"model.{key}")


def build(cfg: dict) -> MLP:
    return MLP(cfg["in_features"], cfg["hidden"], cfg["layers"], cfg["classes"])


def synthetic_batch(cfg: dict, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features and uniform class labels."""
    x = torch.randn(batch_size, cfg["in_features"], generator=gen)
    y = torch.randint(0, cfg["classes"], (batch_size,), generator=gen)
    return x, y


BLOCKS_KEY = "model.layers"
PIPELINE_SPLIT = Split(pre=("inp",), embed=embed, post=("head",), head=logits)


def tp_plan(cfg: dict, sequence_parallel: bool) -> dict:
    """The chain input -> blocks -> head alternates column-wise and row-wise splits: a column-wise layer's
    sharded output (after the elementwise ReLU) is exactly the row-wise layer's sharded input, and the
    row-wise layer's all-reduce makes its output whole again. A chain ending column-wise gathers the logits."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    names = ["inp", *(f"blocks.{i}.fc" for i in range(cfg["layers"])), "head"]
    plan = {name: ColwiseParallel() if i % 2 == 0 else RowwiseParallel() for i, name in enumerate(names)}
    if len(names) % 2:
        plan["head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def tp_split_sizes(cfg: dict) -> dict[str, int]:
    sizes = {"model.hidden": cfg["hidden"]}
    if (cfg["layers"] + 2) % 2:
        sizes["model.classes"] = cfg["classes"]
    return sizes
