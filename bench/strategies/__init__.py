"""Strategies: how the model is parallelised. A strategy is one module and one config, and declares here all
that the rest of bench needs of it: the controller, the planner, the search, the report and the tests read
these hooks and never its name. The contract, checked for every strategy by `tests/unit/test_contracts.py`:

A strategy is `bench/strategies/<name>.py` plus `conf/strategy/<name>.yaml` (`strategy: {name: <name>, <its
knobs>}` and its default `parallel:` degrees). The config tree is the registry: a module without a .yaml is a
helper (`base`, `stages`), not a strategy. The module defines

required
    apply(model, topo, run) -> Parallel
        Wrap, shard or split the model (built on the meta device on this rank, identical on every rank; its
        parameters allocated with `run.materialize`) and build its optimizer. The train loop only calls
        `zero_grad`, `forward_backward(x, y)` and `optimizer_step` on the Parallel it gets; a strategy that
        runs its own step (a pipeline schedule) overrides `forward_backward`. `run` is the resolved run
        (`bench.run.Run`): its config (`run.config`), degrees, and the model's spec.
optional (default)
    check(cfg) -> None                              (accept everything)
        Refuse, with `bench.errors.reject`, a knob or model this strategy cannot honour. The controller runs
        it before any process starts, on the composed config.
    DEGREES: set[str]                               ({"dp"})
        The parallel degrees (of "dp", "dp_replicate", "tp", "pp") it parallelises over; any other must be 1.
    SINGLE_PROCESS: bool                            (False)
        True when one process drives all its devices (`launch.nproc` must then be 1).
    PARITY: "data" | "model"                        ("data")
        Which parity tolerance applies (`bench.measure.parity`): data-parallel reductions, or tensor/pipeline
        splits whose partial sums add up in another order.
    MODEL_NEEDS: set[str], or (cfg) -> set[str]     (nothing)
        What it needs of the model, among `bench.models.NEEDS` ("tp_plan", "sharded_tp_plan",
        "pipeline_split"): the model's own check refuses what it cannot give.
    layouts(world, ranks_per_node) -> list[Degrees] ([]: the planner does not plan it)
        The degrees it can run at `world` ranks, nodes of `ranks_per_node` (None: one node) apart.
    variants(degrees) -> list[dict]                 ([{}]: its config's own knobs only)
        The settings of its own knobs (`strategy.*` overrides) the planner lists at these degrees, each a layout.
    memory(run) -> Memory                           (simulated())
        How its memory per rank is predicted before a run (`bench.plan.memory`): `simulated()` (its own code
        on fake tensors and a fake process group, as it runs), `as_one_replica(...)` (strategy=single on a
        replica's batch, then its optimizer shards and gradient buckets), `stage_by_stage(stages, ...)` (a
        pipeline's ranks, its blocks cut into `stages`, each divided over `shards` ranks at most), or
        `not_predicted(reason)`; the run then says why it was not checked.
    collectives(run, sizes) -> list[dict]           ([]: the simulation traces them)
        The collectives of one step that a fake-tensor trace cannot see (a C++ reducer, a schedule's sends),
        as `collective(kind, ranks, calls, bytes, span)`, counted from the model's `bench.models.ModelSizes`.
    OVERLAP: bool                                   (False)
        Whether its data-parallel communication can hide behind compute (`plan.overlap` of it is assumed to).
    bubble(run) -> float                            (0.0)
        The step's idle time as a multiple of its compute (a pipeline's fill and drain); its point-to-point
        sends wait in every slot of the schedule, 1 + bubble of them.
    batch_unit(run) -> int                          (1)
        What each replica's batch per accumulation step must be a multiple of (a pipeline's micro-batches).

What a strategy needs from the model (blocks, pipeline split, tensor-parallel plan) it reads from the
model's own module: see `bench.models`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from bench import group_options
from bench.parallel.topology import Degrees

DEFAULT_DEGREES = frozenset({"dp"})
PARITY_KINDS = ("data", "model")
MEMORY_KINDS = ("simulated", "one replica", "stage by stage", "not predicted")


@dataclass(frozen=True)
class Memory:
    """How a strategy's memory per rank is predicted (its `memory` hook); see `bench.plan.memory`."""

    how: str  # one of MEMORY_KINDS
    optimizer_shards: int = 1  # one replica: the optimizer state is divided over this many ranks
    gradient_buckets: bool = False  # one replica: a flat copy of the gradients (DDP's buckets) is held too
    reason: str = ""  # not predicted: why
    stages: int = 1  # the pieces the model's blocks are cut into (a pipeline's stages), each held whole by a rank
    shards: int = 0  # the ranks the weights and optimizer state are divided over at most (a stage's, stage by
    # stage); 0: not said (simulated: the world)
    shards_in_step: int = 1  # stage by stage: a stage's weights and gradients during the step (FSDP gathers them)

    @property
    def traces_collectives(self) -> bool:
        """The simulation runs the strategy's own code, so it sees its collectives as they run."""
        return self.how == "simulated"


def simulated(shards: int = 0) -> Memory:
    return Memory("simulated", shards=shards)


def as_one_replica(optimizer_shards: int = 1, gradient_buckets: bool = False) -> Memory:
    return Memory("one replica", optimizer_shards, gradient_buckets)


def stage_by_stage(stages: int, shards: int = 1, shards_in_step: int = 1) -> Memory:
    return Memory("stage by stage", stages=stages, shards=shards, shards_in_step=shards_in_step)


def not_predicted(reason: str) -> Memory:
    return Memory("not predicted", reason=reason)


def collective(kind: str, ranks: int, calls: float, size_bytes: float, span: int | None = None) -> dict:
    """One step's calls of one collective over a group of `ranks` moving `size_bytes` in all (nccl-tests' size:
    all_gather's gathered output, reduce_scatter's input, the all-reduced tensor; "p2p" for sends). `span`: the
    consecutive ranks from rank 0 that the group reaches (None: `ranks`, a group of consecutive ranks)."""
    return {"collective": kind, "ranks": ranks, "span": span or ranks, "calls": calls, "bytes": size_bytes}


@dataclass(frozen=True)
class StrategySpec:
    """A strategy module read through its contract, defaults filled in."""

    name: str
    apply: Callable
    check: Callable[[dict], None]
    degrees: frozenset[str]
    single_process: bool
    parity: str
    model_needs: Callable[[dict], frozenset[str]]
    layouts: Callable[[int, int | None], list[Degrees]]
    variants: Callable[[Degrees], list[dict]]
    memory: Callable[..., Memory]
    collectives: Callable[..., list[dict]]
    overlap: bool
    bubble: Callable[..., float]
    batch_unit: Callable[..., int]


def _accept(cfg: dict) -> None:
    return None


def _unplanned(world: int, ranks_per_node: int | None) -> list[Degrees]:
    return []


def _own_knobs(degrees: Degrees) -> list[dict]:
    return [{}]


def _simulated(run) -> Memory:
    return simulated()


def _traced(run, sizes) -> list[dict]:
    return []


def _no_bubble(run) -> float:
    return 0.0


def _any_batch(run) -> int:
    return 1


def _needs(value) -> Callable[[dict], frozenset[str]]:
    """MODEL_NEEDS, a set or a function of the config, as a function."""
    if callable(value):
        return lambda cfg: frozenset(value(cfg))
    return lambda cfg: frozenset(value)


def strategy_module(name: str) -> ModuleType:
    return importlib.import_module(f"bench.strategies.{name}")


def strategy_spec(name: str) -> StrategySpec:
    module = strategy_module(name)
    return StrategySpec(
        name=name,
        apply=module.apply,
        check=getattr(module, "check", _accept),
        degrees=frozenset(getattr(module, "DEGREES", DEFAULT_DEGREES)),
        single_process=getattr(module, "SINGLE_PROCESS", False),
        parity=getattr(module, "PARITY", "data"),
        model_needs=_needs(getattr(module, "MODEL_NEEDS", frozenset())),
        layouts=getattr(module, "layouts", _unplanned),
        variants=getattr(module, "variants", _own_knobs),
        memory=getattr(module, "memory", _simulated),
        collectives=getattr(module, "collectives", _traced),
        overlap=getattr(module, "OVERLAP", False),
        bubble=getattr(module, "bubble", _no_bubble),
        batch_unit=getattr(module, "batch_unit", _any_batch),
    )


def strategy_names() -> list[str]:
    """Every strategy: the options of the config group `strategy`."""
    return group_options("strategy")


CONTRACT = frozenset({"apply", "check", "DEGREES", "SINGLE_PROCESS", "PARITY", "MODEL_NEEDS", "layouts", "variants",
                      "memory",
                      "collectives", "OVERLAP", "bubble", "batch_unit"})
