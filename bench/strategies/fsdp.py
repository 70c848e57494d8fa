"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel ranks,
each block gathered just in time for its forward and backward. With `parallel.tp > 1` it is the 2-D
FSDP x tensor-parallel hybrid: blocks are split over the "tp" mesh dimension first, then sharded over "dp"."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from bench.errors import reject
from bench.parallel.topology import Degrees, Topology, parallel_degrees
from bench.strategies.base import Parallel, autocast_dtype, checkpoint_and_compile, optimizer_for
from bench.strategies.tensor import check_tp_sizes, parallelize

DEGREES = {"dp", "tp"}
OVERLAP = True  # the next block's all-gather and the last one's reduce-scatter run beside compute


def MODEL_NEEDS(cfg: dict) -> set[str]:
    return {"tp_plan", "sharded_tp_plan"} if parallel_degrees(cfg)["tp"] > 1 else set()


def check(cfg: dict) -> None:
    if cfg["precision"] == "fp16":
        reject("precision", "fp32 or bf16 with strategy=fsdp (FSDP2 has no fp16 gradient scaler here)", "fp16")
    tp = parallel_degrees(cfg)["tp"]
    if tp > 1:
        check_tp_sizes(cfg, tp)


def layouts(world: int, ranks_per_node: int | None) -> list[Degrees]:
    """One rank too (FSDP's own overheads, nothing sharded); 2-D: FSDP over dp replicas of tp-sharded layers,
    the tensor-parallel group within a node (its collectives are per layer)."""
    two_d = [Degrees(dp=world // tp, tp=tp) for tp in range(2, world)
             if world % tp == 0 and (not ranks_per_node or tp <= ranks_per_node)]
    return [Degrees(dp=world), *two_d]


def apply(model: nn.Module, topo: Topology, run) -> Parallel:
    mesh = topo.mesh()
    if topo.tp > 1:
        parallelize(model, mesh["tp"], run)
    checkpoint_and_compile(model, run)
    shard = {
        "mesh": mesh["dp"],
        "reshard_after_forward": run.config["strategy"]["reshard_after_forward"],
        "mp_policy": mixed_precision(run.config["precision"]),
    }
    for block in run.model.blocks_of(model):
        fully_shard(block, **shard)
    fully_shard(model, **shard)  # the root: embeddings, head and whatever lies outside the blocks
    run.materialize(model, topo.device)  # only now: each rank allocates its own shards
    facts = {"reshard_after_forward": shard["reshard_after_forward"], "mesh": f"dp={topo.dp} x tp={topo.tp}"}
    return Parallel.build(model, optimizer_for(model.parameters(), run), topo, run, own_mixed_precision=True,
                          extra=facts)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16: compute in bf16 (parameters gathered in bf16), reduce gradients in fp32."""
    if precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=autocast_dtype(precision), reduce_dtype=torch.float32)
