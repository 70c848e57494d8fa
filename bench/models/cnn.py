"""A small ResNet-style image classifier (the classic nn.DataParallel workload): a convolutional stem,
residual blocks at constant width, then global average pooling and a linear head.

GroupNorm rather than BatchNorm: batch statistics would differ between one device's batch and each
data-parallel shard, and every strategy must train the same model as one device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.models import Split


class Block(nn.Module):
    def __init__(self, width: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(out)))


class Head(nn.Module):
    def __init__(self, width: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class CNN(nn.Module):
    def __init__(self, in_channels: int, width: int, blocks: int, classes: int, groups: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.GroupNorm(groups, width), nn.ReLU())
        self.blocks = nn.ModuleList(Block(width, groups) for _ in range(blocks))
        self.head = Head(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = stem(self, x)
        for block in self.blocks:
            x = block(x)
        return head(self, x)


def stem(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.stem(x)


def head(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.head(x)


def check(cfg: dict, needs: frozenset[str]) -> None:
    from bench.errors import positive_int, reject

    for key in ("image_size", "in_channels", "width", "blocks", "classes", "groups"):
        positive_int(cfg, f"model.{key}")
    model = cfg["model"]
    if model["width"] % model["groups"]:
        reject("model.width", f"a multiple of model.groups={model['groups']} (GroupNorm splits the channels)",
               model["width"], "; or change model.groups")


def build(cfg: dict) -> CNN:
    if cfg["width"] % cfg["groups"]:
        raise ValueError(f"model.width={cfg['width']} must be divisible by model.groups={cfg['groups']}")
    return CNN(cfg["in_channels"], cfg["width"], cfg["blocks"], cfg["classes"], cfg["groups"])


def synthetic_batch(cfg: dict, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian images and uniform class labels."""
    x = torch.randn(batch_size, cfg["in_channels"], cfg["image_size"], cfg["image_size"], generator=gen)
    y = torch.randint(0, cfg["classes"], (batch_size,), generator=gen)
    return x, y


BLOCKS_KEY = "model.blocks"
PIPELINE_SPLIT = Split(pre=("stem",), embed=stem, post=("head",), head=head)
