"""What runs inside each pipeline stage of a 3-D layout (torchtitan's order: the model split into stages,
each stage's layers tensor-parallel over "tp", then FSDP2-sharded over the stage's data-parallel ranks),
for `strategy=pipeline` and for the planner's simulation of it (`bench.plan.pipeline`), which must build the
stages exactly as the ranks do.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from bench.models.init import is_dtensor
from bench.parallel.topology import REPLICATE
from bench.strategies.base import unwrap
from bench.strategies.fsdp import mixed_precision
from bench.strategies.tensor import parallelize


def sharded(cfg: dict, dp: int) -> bool:
    """Whether each stage is FSDP-sharded over its dp > 1 replicas (`strategy.fsdp`), not all-reduced."""
    return bool(cfg["strategy"]["fsdp"]) and dp > 1


def tensor_parallel(model: nn.Module, mesh, run) -> nn.Module:
    """The whole model's layers split over the "tp" sub-mesh by the model's own plan (on the meta device,
    before the cut: the plan names the whole model's paths), where tp > 1."""
    if mesh["tp"].size() > 1:
        parallelize(model, mesh["tp"], run)
    return model


def shard_stage(stage: nn.Module, mesh, run) -> None:
    """FSDP2 over the stage's data-parallel ranks (HSDP's (dp_replicate, dp_shard) mesh where there are
    replicas): each block a unit, then the stage itself (its embedding or head). Parameters stay gathered from
    a micro-batch's forward to the step's last backward (reshard_after_forward=False, torchtitan's choice with
    a pipeline: resharding would gather every block again for every micro-batch); torch's schedule reduces the
    gradients once, after the last micro-batch."""
    names = mesh.mesh_dim_names
    shard = {"mesh": mesh[REPLICATE, "dp_shard"] if REPLICATE in names else mesh["dp"],
             "reshard_after_forward": False, "mp_policy": mixed_precision(run.config["precision"])}
    for block in stage.stage_blocks.values():
        fully_shard(block, **shard)
    fully_shard(stage, **shard)


def gathered_parameters(stages: list[nn.Module], keep: bool) -> dict:
    """Every parameter of `stages`, whole, on the CPU, by its name in the single run (kept where `keep`).
    Collective where a parameter is a DTensor (tensor-parallel or FSDP-sharded): every rank of a stage calls
    it, in the same order."""
    out = {}
    for stage in stages:
        for name, p in unwrap(stage).named_parameters():
            whole = p.full_tensor() if is_dtensor(p) else p
            if keep:
                out[name] = whole.detach().cpu().clone()
    return out


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view of its storage), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t
