"""The layouts `python -m bench.plan` considers: for each world size, each strategy's degrees (its `layouts`
hook), activation checkpointing and gradient accumulation, as the runs `python -m bench` would run (checked by
its own checks)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass

from bench.checks import validate
from bench.errors import ConfigError
from bench.parallel.topology import CONTEXT, EXPERT, Degrees
from bench.run import Run
from bench.strategies import strategy_spec


@dataclass(frozen=True)
class Layout:
    """One way to run the model: a strategy at its degrees over `nodes` nodes, with or without activation
    checkpointing and gradient accumulation."""

    strategy: str
    degrees: Degrees
    nodes: int = 1
    activation_checkpointing: bool = False
    grad_accum: int = 1
    knobs: tuple[tuple[str, object], ...] = ()  # the strategy's own knobs set for this layout (its `variants`)

    @property
    def label(self) -> str:
        """Its degrees as tables print them, and its knobs: "2x2x2 fsdp=true"."""
        knobs = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.knobs)
        return f"{self.degrees.label} {knobs}".strip()

    @property
    def world(self) -> int:
        return self.degrees.world

    @property
    def ranks_per_node(self) -> int:
        return self.world // self.nodes


@dataclass(frozen=True)
class Candidate:
    """A layout, the run `python -m bench` would make of it, and why that run would be refused (None: it runs)."""

    layout: Layout
    run: Run | None
    refusal: str | None


def candidates(base: dict, plan: dict, knobs: dict[str, dict], ranks_per_node: int | None = None) -> list[Candidate]:
    """Every layout the plan asks for. `base` is the training config composed with the plan's overrides,
    `plan` its `plan.*` keys, `knobs` each strategy's own group (conf/strategy/<name>.yaml); a world larger
    than `ranks_per_node` spans ceil(world / ranks_per_node) nodes of that many ranks. Each strategy's own
    variants (its `variants` hook) are planned with each of the knob sets `plan.variants` lists for it."""
    worlds = plan["world_sizes"] or [base["launch"]["nproc"]]
    out = []
    for world, name, checkpointing, accum in itertools.product(worlds, knobs, plan["activation_checkpointing"],
                                                               plan["grad_accum"]):
        spec = strategy_spec(name)
        for degrees in with_experts(spec, with_context(spec, spec.layouts(world, ranks_per_node),
                                                       plan.get("cp") or [1], ranks_per_node), plan.get("ep") or [1]):
            nodes = -(-world // ranks_per_node) if ranks_per_node and world > ranks_per_node else 1
            extras = (plan.get("variants") or {}).get(name) or [{}]
            for variant, extra in itertools.product(spec.variants(degrees), extras):
                layout = Layout(name, degrees, nodes, checkpointing, accum, tuple(sorted((variant | extra).items())))
                cfg = layout_config(base, knobs[name], layout)
                why = refusal(cfg)
                out.append(Candidate(layout, None if why else Run.of(cfg), why))
    return out


def with_context(spec, layouts: list[Degrees], cps: list[int], ranks_per_node: int | None) -> list[Degrees]:
    """Each layout at each context-parallel degree of `plan.cp`, for a strategy that parallelises over cp:
    cp of its data-parallel ranks each take a share of every sequence instead of their own samples, the cp
    group within a node, beside the tensor-parallel ranks (its K/V all-gather is per layer, as theirs)."""
    out = []
    for degrees, cp in itertools.product(layouts, cps):
        if cp == 1:
            out.append(degrees)
        elif CONTEXT in spec.degrees and degrees.dp % cp == 0 and (degrees.dp // cp) % degrees.dp_replicate == 0 \
                and (not ranks_per_node or ranks_per_node % (cp * degrees.tp) == 0):
            out.append(dataclasses.replace(degrees, dp=degrees.dp // cp, cp=cp))
    return out


def with_experts(spec, layouts: list[Degrees], eps: list[int]) -> list[Degrees]:
    """Each layout at each expert-parallel degree of `plan.ep` that divides its data-parallel ranks, for a
    strategy that splits experts (the model's expert count is the run's checks' to hold against it)."""
    return [dataclasses.replace(degrees, ep=ep) for degrees, ep in itertools.product(layouts, eps)
            if ep == 1 or (EXPERT in spec.degrees and degrees.dp % ep == 0)]


def layout_config(base: dict, knobs: dict, layout: Layout, global_batch: int | None = None) -> dict:
    """The config `python -m bench` would run for one layout (the strategy's own keys `knobs`), its world of
    dp x tp x pp ranks over `layout.nodes` nodes, at `global_batch` (None: the base's)."""
    cfg = copy.deepcopy(base)
    cfg.update(strategy=copy.deepcopy(knobs) | dict(layout.knobs), parallel=layout.degrees.as_dict(),
               grad_accum=layout.grad_accum, activation_checkpointing=layout.activation_checkpointing)
    cfg["launch"] = {**cfg["launch"], "nnodes": layout.nodes, "nproc": layout.ranks_per_node}
    if global_batch is not None:
        cfg["global_batch"] = global_batch
    return cfg


def refusal(cfg: dict) -> str | None:
    """Why `python -m bench` would refuse this config (its own checks, bar those of this machine's devices and
    of one machine's launcher: the plan may be for GPUs and nodes this machine lacks), or None."""
    launch = cfg["launch"]
    # the layout's checks, on one node: how the ranks are spread over machines changes none of them
    as_run = copy.deepcopy({**cfg, "launch": {**launch, "nnodes": 1, "nproc": launch["nnodes"] * launch["nproc"]}})
    if cfg["device"] == "cuda":
        as_run.update(device="cpu", backend="auto")
    try:
        validate(as_run)
    except ConfigError as exc:
        return str(exc)
    return None
