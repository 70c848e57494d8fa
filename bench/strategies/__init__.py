"""Strategies: how the model is parallelised. The contract, checked for every strategy by
`tests/test_contracts.py`:

A strategy is `bench/strategies/<name>.py` plus `conf/strategy/<name>.yaml` (`strategy: {name: <name>, <its
knobs>}` and its default `parallel:` degrees). The config tree is the registry: a module without a .yaml is a
helper (`parallel`, `stages`), not a strategy. The module defines

required
    apply(model, topo, cfg) -> Parallel
        Wrap, shard or split the model (built on this rank, identical on every rank) and build its optimizer.
        The train loop only calls `zero_grad`, `forward_backward(x, y)` and `optimizer_step` on the Parallel
        it gets; a strategy that runs its own step (a pipeline schedule) overrides `forward_backward`.
optional (default)
    check(cfg) -> None              (accept everything)
        Refuse, with `bench.checks.reject`, a knob or model this strategy cannot honour. The controller runs
        it before any process starts.
    DEGREES: frozenset[str]         ({"dp"})
        The parallel degrees (of "dp", "tp", "pp") it parallelises over; any other degree must be 1.
    PARITY: "data" | "model"        ("data")
        Which parity tolerance applies (`bench.measure.parity`): data-parallel reductions, or tensor/pipeline
        splits whose partial sums add up in another order.
    SINGLE_PROCESS: bool            (False)
        True when one process drives all its devices (`launch.nproc` must then be 1).

What a strategy needs from the model (blocks, pipeline split, tensor-parallel plan) it reads from the
model's own module: see `bench.models`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from bench import group_options

DEFAULT_DEGREES = frozenset({"dp"})
PARITY_KINDS = ("data", "model")


@dataclass(frozen=True)
class StrategySpec:
    """A strategy module read through its contract, defaults filled in."""

    name: str
    apply: Callable
    check: Callable[[dict], None]
    degrees: frozenset[str]
    parity: str
    single_process: bool


def _accept(cfg: dict) -> None:
    return None


def strategy_module(name: str) -> ModuleType:
    return importlib.import_module(f"bench.strategies.{name}")


def strategy_spec(name: str) -> StrategySpec:
    module = strategy_module(name)
    return StrategySpec(
        name=name,
        apply=module.apply,
        check=getattr(module, "check", _accept),
        degrees=frozenset(getattr(module, "DEGREES", DEFAULT_DEGREES)),
        parity=getattr(module, "PARITY", "data"),
        single_process=getattr(module, "SINGLE_PROCESS", False),
    )


def strategy_names() -> list[str]:
    """Every strategy: the options of the config group `strategy`."""
    return group_options("strategy")


def apply_strategy(model, topo, cfg: dict):
    return strategy_spec(cfg["strategy"]["name"]).apply(model, topo, cfg)
