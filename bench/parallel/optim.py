"""The optimizer every strategy uses unless it needs its own (e.g. a sharded one)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def optimizer_class(optim_cfg: dict) -> tuple[type[torch.optim.Optimizer], dict]:
    """The optimizer's class and keyword arguments, for wrappers that build it themselves (ZeRO)."""
    name = optim_cfg["name"]
    if name == "sgd":
        kwargs = {"lr": optim_cfg["lr"], "momentum": optim_cfg["momentum"], "weight_decay": optim_cfg["weight_decay"]}
        return torch.optim.SGD, kwargs
    if name == "adamw":
        kwargs = {"lr": optim_cfg["lr"], "weight_decay": optim_cfg["weight_decay"]}
        # betas and eps where the config adds them (+optim.betas=[0.9,0.95]), else torch's defaults
        kwargs |= {key: optim_cfg[key] for key in ("betas", "eps") if key in optim_cfg}
        return torch.optim.AdamW, kwargs
    raise ValueError(f"optim.name: expected sgd or adamw, got {name!r}")


def build_optimizer(params: Iterable[torch.nn.Parameter], optim_cfg: dict) -> torch.optim.Optimizer:
    cls, kwargs = optimizer_class(optim_cfg)
    return cls(params, **kwargs)
