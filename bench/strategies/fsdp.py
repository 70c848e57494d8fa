"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel ranks,
each block gathered just in time for its forward and backward. With `parallel.tp > 1` it is the 2-D
FSDP x tensor-parallel hybrid: blocks are split over the "tp" mesh dimension first, then sharded over "dp"."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from bench.checks import parallel_degrees, reject
from bench.models import materialize_model, model_blocks
from bench.rank.optim import build_optimizer
from bench.rank.topology import Topology
from bench.strategies.parallel import Parallel, autocast_dtype, checkpoint_and_compile
from bench.strategies.tensor import check_tp_sizes, parallelize

DEGREES = {"dp", "tp"}


def check(cfg: dict) -> None:
    if cfg["precision"] == "fp16":
        reject("precision", "fp32 or bf16 with strategy=fsdp (FSDP2 has no fp16 gradient scaler here)", "fp16")
    tp = parallel_degrees(cfg)["tp"]
    if tp > 1:
        check_tp_sizes(cfg, tp)


def apply(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    mesh = topo.mesh()
    if topo.tp > 1:
        parallelize(model, mesh["tp"], cfg)
    checkpoint_and_compile(model, cfg)
    shard = {
        "mesh": mesh["dp"],
        "reshard_after_forward": cfg["strategy"]["reshard_after_forward"],
        "mp_policy": mixed_precision(cfg["precision"]),
    }
    for block in model_blocks(model, cfg["model"]):
        fully_shard(block, **shard)
    fully_shard(model, **shard)  # the root: embeddings, head and whatever lies outside the blocks
    materialize_model(model, cfg, topo.device)  # only now: each rank allocates its own shards
    facts = {"reshard_after_forward": shard["reshard_after_forward"], "mesh": f"dp={topo.dp} x tp={topo.tp}"}
    optimizer = build_optimizer(model.parameters(), cfg["optim"])
    return Parallel.build(model, optimizer, topo, cfg, own_mixed_precision=True, extra=facts)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16: compute in bf16 (parameters gathered in bf16), reduce gradients in fp32."""
    if precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=autocast_dtype(precision), reduce_dtype=torch.float32)
