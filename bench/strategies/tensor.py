"""Tensor parallelism (layer-wise partitioning): each layer's weight matrices split over the
"tp" ranks with DTensor's `parallelize_module` — column-wise then row-wise, so one all-reduce joins each
pair. The plan is the model's own (`tp_plan` in its module): attention split by heads, the feed-forward by
its hidden units. `strategy.sequence_parallel=true` also splits the norms and the residual stream along the
sequence (GPT). Every rank of a tensor-parallel group sees the same batch."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import parallelize_module

from bench.errors import reject
from bench.models import model_spec
from bench.parallel.topology import Degrees, Topology, parallel_degrees
from bench.strategies.base import Parallel, checkpoint_and_compile, optimizer_for

PARITY = "model"
DEGREES = {"tp"}
MODEL_NEEDS = {"tp_plan"}


def check(cfg: dict) -> None:
    check_tp_sizes(cfg, parallel_degrees(cfg)["tp"])


def check_tp_sizes(cfg: dict, tp: int) -> None:
    """Every split dimension must divide by the tensor-parallel degree (heads, hidden units, vocabulary)."""
    model = model_spec(cfg["model"])
    if model.tp_plan is None:
        reject("model", "a model whose module defines tp_plan (a tensor-parallel plan) with tensor parallelism",
               cfg["model"]["name"])
    for key, size in model.tp_split_sizes(cfg["model"]).items():
        if size % tp:
            reject(key, f"a multiple of the tensor-parallel degree {tp} (it is split over the tp ranks)", size,
                   "; or change parallel.tp")
    if cfg["strategy"].get("sequence_parallel") and not model.sequence_parallel:
        reject("strategy.sequence_parallel", f"false for model={cfg['model']['name']} (no sequence dimension)",
               True)


def layouts(world: int, ranks_per_node: int | None) -> list[Degrees]:
    return [Degrees(tp=world)] if world > 1 else []


def parallelize(model: nn.Module, tp_mesh, run) -> nn.Module:
    """Split the model's layers over `tp_mesh` in place, following its own plan."""
    sequence_parallel = run.config["strategy"].get("sequence_parallel", False)
    return parallelize_module(model, tp_mesh, run.model.tp_plan(run.config["model"], sequence_parallel))


def apply(model: nn.Module, topo: Topology, run) -> Parallel:
    parallelize(model, topo.mesh()["tp"], run)  # on the meta device
    run.materialize(model, topo.device)  # then each rank allocates its own slices
    checkpoint_and_compile(model, run)
    facts = {"tp": topo.tp, "sequence_parallel": run.config["strategy"]["sequence_parallel"]}
    return Parallel.build(model, optimizer_for(model.parameters(), run), topo, run, extra=facts)
