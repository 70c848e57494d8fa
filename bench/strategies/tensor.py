"""Tensor parallelism (layer-wise partitioning): each layer's weight matrices split over the
"tp" ranks with DTensor's `parallelize_module` — column-wise then row-wise, so one all-reduce joins each
pair. The plan is the model's own (`tp_plan` in its module): attention split by heads, the feed-forward by
its hidden units. `strategy.sequence_parallel=true` also splits the norms and the residual stream along the
sequence (GPT). Every rank of a tensor-parallel group sees the same batch."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import parallelize_module

from bench.checks import parallel_degrees, reject
from bench.models import materialize_model, model_spec
from bench.rank.optim import build_optimizer
from bench.rank.topology import Topology
from bench.strategies.parallel import Parallel, checkpoint_and_compile

PARITY = "model"
DEGREES = {"tp"}


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


def parallelize(model: nn.Module, tp_mesh, cfg: dict) -> nn.Module:
    """Split the model's layers over `tp_mesh` in place, following its own plan."""
    plan = model_spec(cfg["model"]).tp_plan(cfg["model"], cfg["strategy"].get("sequence_parallel", False))
    return parallelize_module(model, tp_mesh, plan)


def apply(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    parallelize(model, topo.mesh()["tp"], cfg)  # on the meta device
    materialize_model(model, cfg, topo.device)  # then each rank allocates its own slices
    checkpoint_and_compile(model, cfg)
    facts = {"tp": topo.tp, "sequence_parallel": cfg["strategy"]["sequence_parallel"]}
    return Parallel.build(model, build_optimizer(model.parameters(), cfg["optim"]), topo, cfg, extra=facts)
