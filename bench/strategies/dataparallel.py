"""`nn.DataParallel`: one process drives several GPUs, scattering each batch from device 0 and gathering
the outputs back to it (data parallelism as it was before DDP). Without GPUs it just calls the module
on the CPU — the row then says it ran on one device."""

from __future__ import annotations

import torch
from torch import nn

from bench.errors import reject
from bench.parallel.topology import Topology
from bench.strategies import Memory, not_predicted, simulated
from bench.strategies.base import Parallel, checkpoint_and_compile, optimizer_for

SINGLE_PROCESS = True  # it drives `strategy.devices` GPUs itself


def check(cfg: dict) -> None:
    devices = cfg["strategy"]["devices"]
    if devices is not None and (not isinstance(devices, int) or devices < 1):
        reject("strategy.devices", "a positive number of GPUs or null (all visible)", devices)
    if cfg["device"] == "cuda" and devices is not None and devices > torch.cuda.device_count():
        reject("strategy.devices", f"at most {torch.cuda.device_count()} (the GPUs visible here)", devices)


def device_count(cfg) -> int:
    """The devices the one process drives: `strategy.devices` GPUs (null: all visible), or the CPU alone."""
    if cfg["device"] != "cuda":
        return 1  # nn.DataParallel calls the module itself when there is no GPU
    return cfg["strategy"]["devices"] or torch.cuda.device_count()


def memory(run) -> Memory:
    if device_count(run.config) > 1:
        return not_predicted("nn.DataParallel over several GPUs gathers every output on device 0, which no "
                             "one device's simulation holds")
    return simulated()


def apply(model: nn.Module, topo: Topology, run) -> Parallel:
    model = checkpoint_and_compile(run.materialize(model, topo.device), run)
    count = device_count(run.config) if topo.device_type == "cuda" else 1
    if topo.device_type == "cuda":
        wrapped = nn.DataParallel(model, device_ids=list(range(count)))
        facts = {"device_ids": list(range(count))}
    else:
        wrapped = nn.DataParallel(model)
        facts = {"note": "no GPU: nn.DataParallel ran the module on the CPU, one device"}
    return Parallel.build(wrapped, optimizer_for(model.parameters(), run), topo, run, devices=count, extra=facts)
