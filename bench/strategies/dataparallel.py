"""`nn.DataParallel`: one process drives several GPUs, scattering each batch from device 0 and gathering
the outputs back to it (data parallelism as it was before DDP). Without GPUs it just calls the module
on the CPU — the row then says it ran on one device."""

from __future__ import annotations

import torch
from torch import nn

from bench.checks import reject
from bench.models import materialize_model
from bench.rank.optim import build_optimizer
from bench.rank.topology import Topology
from bench.strategies.parallel import Parallel, checkpoint_and_compile

SINGLE_PROCESS = True  # it drives `strategy.devices` GPUs itself


def check(cfg: dict) -> None:
    devices = cfg["strategy"]["devices"]
    if devices is not None and (not isinstance(devices, int) or devices < 1):
        reject("strategy.devices", "a positive number of GPUs or null (all visible)", devices)
    if cfg["device"] == "cuda" and devices is not None and devices > torch.cuda.device_count():
        reject("strategy.devices", f"at most {torch.cuda.device_count()} (the GPUs visible here)", devices)


def apply(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    model = checkpoint_and_compile(materialize_model(model, cfg, topo.device), cfg)
    if topo.device_type == "cuda":
        count = cfg["strategy"]["devices"] or torch.cuda.device_count()
        wrapped = nn.DataParallel(model, device_ids=list(range(count)))
        facts = {"device_ids": list(range(count))}
    else:
        count = 1  # nn.DataParallel silently calls the module itself when there is no GPU
        wrapped = nn.DataParallel(model)
        facts = {"note": "no GPU: nn.DataParallel ran the module on the CPU, one device"}
    optimizer = build_optimizer(model.parameters(), cfg["optim"])
    return Parallel.build(wrapped, optimizer, topo, cfg, devices=count, extra=facts)
