"""The optimizer every strategy uses unless it needs its own (e.g. a sharded one)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], optim_cfg: dict) -> torch.optim.Optimizer:
    name = optim_cfg["name"]
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=optim_cfg["lr"], momentum=optim_cfg["momentum"], weight_decay=optim_cfg["weight_decay"]
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=optim_cfg["lr"], weight_decay=optim_cfg["weight_decay"])
    raise ValueError(f"unknown optim.name={name!r}; expected sgd or adamw")
