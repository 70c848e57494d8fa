"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel ranks,
each block gathered just in time for its forward and backward (ZeRO-3). With `parallel.tp > 1` it is the 2-D
FSDP x tensor-parallel hybrid: blocks are split over the "tp" mesh dimension first, then sharded over "dp".

- HSDP (`parallel.dp_replicate > 1`): FSDP2 over the 2-D (dp_replicate, dp_shard) mesh: each replica shards
  over its dp_shard ranks (reduce-scatter, all-gather within the group, a node in plans) and the replicas
  all-reduce their gradient shards across nodes.
- ZeRO-2 (`strategy.reshard_after_forward=false`): parameters stay gathered from forward to backward, so a step
  gathers them once and reduce-scatters the gradients: ZeRO-2's memory (whole weights while computing, sharded
  gradients and optimizer state) and its communication. The row names the stage (`zero_stage`).
- Context parallelism (`parallel.cp > 1`): each of a replica's cp ranks holds a share of every sequence
  (`bench.parallel.context`); attention all-gathers the keys and values over "cp" (`strategy.cp_method=
  allgather`) or passes them around its ranks (`ring`). The cp ranks hold the same
  parameters and see different tokens, so FSDP shards over dp x cp together (torchtitan's "dp_shard_cp").
- Expert parallelism (`parallel.ep > 1`): ep consecutive data-parallel ranks split each mixture-of-experts
  layer's experts (`bench.parallel.experts`); tokens go to the rank holding their expert over all-to-all. FSDP
  shards the other weights over dp, and each rank's experts over the dp / ep replicas holding the same ones.
- `strategy.offload=true`: FSDP2's CPUOffloadPolicy (sharded parameters, gradients and optimizer state in
  host memory, copied in and out in the step; the optimizer steps on the CPU). On a CPU run they are in host
  memory already: it changes nothing, and the row says so."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from bench.errors import reject
from bench.parallel.context import ContextGroup, has_ring_attention
from bench.parallel.experts import expert_layers, expert_parallel
from bench.parallel.topology import CONTEXT, EXPERT, REPLICATE, Degrees, Topology, parallel_degrees
from bench.strategies import Memory, not_predicted, simulated
from bench.strategies.base import Parallel, autocast_dtype, checkpoint_and_compile, optimizer_for
from bench.strategies.tensor import check_tp_sizes, parallelize

DEGREES = {"dp", REPLICATE, "tp", CONTEXT, EXPERT}
CP_METHODS = ("allgather", "ring")
OVERLAP = True  # the next block's all-gather and the last one's reduce-scatter run beside compute


def MODEL_NEEDS(cfg: dict) -> set[str]:
    degrees = parallel_degrees(cfg)
    return ({"tp_plan", "sharded_tp_plan"} if degrees["tp"] > 1 else set()) | (
        {"context_parallel"} if degrees[CONTEXT] > 1 else set()) | ({"experts"} if degrees[EXPERT] > 1 else set())


def check(cfg: dict) -> None:
    if cfg["precision"] == "fp16":
        reject("precision", "fp32 or bf16 with strategy=fsdp (FSDP2 has no fp16 gradient scaler here)", "fp16")
    tp = parallel_degrees(cfg)["tp"]
    if tp > 1:
        check_tp_sizes(cfg, tp)
    method = cp_method(cfg["strategy"])
    if method not in CP_METHODS:
        reject("strategy.cp_method", "allgather (keys and values all-gathered) or ring (passed around the cp ranks)",
               method)
    if method == "ring" and not has_ring_attention():
        reject("strategy.cp_method", f"allgather with torch {torch.__version__} (its ring attention, "
               "torch.distributed.tensor.experimental._context_parallel, came with torch 2.9)", method)


def cp_method(knobs: dict) -> str:
    """`strategy.cp_method`: allgather where a config written before it was a knob has none."""
    return knobs.get("cp_method", "allgather")


def layouts(world: int, ranks_per_node: int | None) -> list[Degrees]:
    """One rank too (FSDP's own overheads, nothing sharded); 2-D: FSDP over dp replicas of tp-sharded layers,
    the tensor-parallel group within a node (its collectives are per layer). Over several nodes each of these
    as HSDP too: sharded within a node, replicated across the nodes (torchtitan's and Megatron's choice)."""
    tps = [tp for tp in range(1, world) if world % tp == 0 and (not ranks_per_node or tp <= ranks_per_node)]
    out = [Degrees(dp=world // tp, tp=tp) for tp in tps] or [Degrees(dp=world)]
    if ranks_per_node and world > ranks_per_node and world % ranks_per_node == 0:
        out += [Degrees(dp=world // tp, tp=tp, dp_replicate=world // ranks_per_node)
                for tp in tps if ranks_per_node % tp == 0 and ranks_per_node > tp]
    return out


def zero_stage(cfg: dict) -> int:
    """3: parameters resharded after forward and gathered again for backward; 2: gathered once per step."""
    return 3 if cfg["strategy"]["reshard_after_forward"] else 2


def memory(run) -> Memory:
    if run.config["strategy"]["offload"] and run.device == "cuda":
        return not_predicted("strategy.offload=true: what stays on the GPU between the host copies is not simulated")
    degrees = run.degrees
    return simulated(shards=degrees.dp_shard * degrees.cp * degrees.tp)  # HSDP's replicas each hold it all


def apply(model: nn.Module, topo: Topology, run) -> Parallel:
    mesh, knobs = topo.mesh(), run.config["strategy"]
    if topo.tp > 1:
        parallelize(model, mesh["tp"], run)
    if topo.cp > 1:
        run.model.context_parallel(model, ContextGroup(mesh[CONTEXT].get_group(), cp_method(knobs)))
    tokens: dict = {}  # each expert layer's tokens per expert, as this rank routed them (`count_tokens`)
    if topo.ep > 1:
        expert_parallel(model, topo.expert_mesh(), tokens)
    checkpoint_and_compile(model, run)
    offload = knobs["offload"] and topo.device_type == "cuda"
    shard = {
        "mesh": shard_mesh(topo),
        "reshard_after_forward": knobs["reshard_after_forward"],
        "mp_policy": mixed_precision(run.config["precision"]),
        **({"offload_policy": CPUOffloadPolicy()} if offload else {}),
    }
    if topo.ep > 1:
        shard_experts(model, topo, shard)
    else:
        shard["shard_placement_fn"] = experts_placement(model, shard["mesh"].shape[-1])
    for block in run.model.blocks_of(model):
        fully_shard(block, **shard)
    fully_shard(model, **shard)  # the root: embeddings, head and whatever lies outside the blocks
    # only now: each rank allocates its own shards (offloaded: in host memory, where FSDP2 keeps them)
    run.materialize(model, "cpu" if offload else topo.device)
    if offload:  # buffers are not sharded: FSDP2 leaves them where they lie, and the GPU computes with them
        for module in model.modules():  # (torchtitan's buffer_device)
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(topo.device)
    dp = f"dp_replicate={topo.dp_replicate} x dp_shard={topo.dp_shard}" if topo.dp_replicate > 1 else f"dp={topo.dp}"
    dp += f" x cp={topo.cp}" if topo.cp > 1 else ""
    facts = {"zero_stage": zero_stage(run.config), "reshard_after_forward": shard["reshard_after_forward"],
             "mesh": f"{dp} x tp={topo.tp}", "offload": offload_fact(knobs["offload"], topo.device_type)}
    if topo.cp > 1:
        facts["cp_method"] = cp_method(knobs)
    if topo.ep > 1:
        facts["expert_load"] = tokens
    return Parallel.build(model, optimizer_for(model.parameters(), run), topo, run, own_mixed_precision=True,
                          extra=facts)


def shard_experts(model: nn.Module, topo: Topology, shard: dict) -> None:
    """Each expert layer's experts, split over "ep" already, sharded over the ranks holding the same experts
    ("dp_mod_ep", torchtitan's): their gradients are those of the ep group's tokens, so the reduce-scatter's sum
    over dp / ep replicas divided by dp is the mean over the global batch, as every other weight's. Sharded on
    the experts' dimension while each replica holds at least one expert per rank, else on the next."""
    from torch.distributed.tensor import Shard

    replicas = topo.expert_mesh()["dp_mod_ep"]
    for layer in expert_layers(model).values():
        dim = 0 if (layer.num_experts // topo.ep) % replicas.size() == 0 else 1
        fully_shard(layer, **shard | {"mesh": replicas, "shard_placement_fn": lambda _, dim=dim: Shard(dim)})
        divide = getattr(layer, "set_gradient_divide_factor", None) or layer.set_reduce_scatter_divide_factor
        divide(topo.dp)  # (an older torch's name for it: the project takes torch 2.6 on)
        # gloo has no pre-multiplied sum: sum, then divide. Not for one replica: it reduces nothing, and torch
        # 2.13's FSDP then divides twice (found: parity 5.8e-3 at ep = dp = 4)
        if replicas.size() > 1 and dist.get_backend(replicas.get_group()) == "gloo":
            layer.set_force_sum_reduction_for_comms(True)


def experts_placement(model: nn.Module, shards: int):
    """FSDP's placement of each parameter: stacked experts' weights on their second dimension where their count
    does not divide among the shards (8 experts over 64 ranks would pad each rank's shard to a whole expert: 8
    times the layer gathered; found as 93 GB a rank for a 2-layer Mixtral 8x7B), every other one on its first."""
    from torch.distributed.tensor import Shard

    second = {p for layer in expert_layers(model).values() if layer.num_experts % shards
              for p in layer.parameters(recurse=False) if p.ndim > 1 and p.shape[1] % shards == 0}
    return lambda p: Shard(1) if p in second else None


def shard_mesh(topo: Topology):
    """The ranks FSDP shards over: the data-parallel ranks and, with context parallelism, their cp ranks too
    (same parameters, other tokens); HSDP: (replicas, the shard group) as a 2-D mesh."""
    if topo.dp_replicate > 1:
        return topo.submesh("dp_replicate_shard_cp") if topo.cp > 1 else topo.mesh()[REPLICATE, "dp_shard"]
    return topo.submesh("dp_cp" if topo.cp > 1 else "dp")


def offload_fact(offload: bool, device_type: str) -> bool | str:
    if offload and device_type != "cuda":
        return "no effect: on the CPU the shards are in host memory already"
    return offload


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16: compute in bf16 (parameters gathered in bf16), reduce gradients in fp32."""
    if precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=autocast_dtype(precision), reduce_dtype=torch.float32)
