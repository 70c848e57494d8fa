"""The layouts `python -m bench.plan` considers: for each world size, each strategy's degrees, activation
checkpointing and gradient accumulation, as configs `python -m bench` would run (checked by its own checks)."""

from __future__ import annotations

import copy
import itertools

from bench.checks import ConfigError, parallel_degrees, validate

# The layouts each strategy takes at a world size W: one rank is strategy=single's and fsdp's; FSDP may shard
# over dp = W / tp replicas of tensor-parallel layers, and a pipeline of pp stages be replicated dp = W / pp times.
DEGREES = {
    "single": lambda w: [{"dp": 1, "tp": 1, "pp": 1}] if w == 1 else [],
    "ddp": lambda w: [{"dp": w, "tp": 1, "pp": 1}] if w > 1 else [],
    "zero": lambda w: [{"dp": w, "tp": 1, "pp": 1}] if w > 1 else [],
    # one rank too (FSDP's own overheads, nothing sharded); 2-D: FSDP over dp replicas of tp-sharded layers
    "fsdp": lambda w: [{"dp": w, "tp": 1, "pp": 1}] + [{"dp": w // tp, "tp": tp, "pp": 1}
                                                       for tp in range(2, w) if w % tp == 0],
    "tensor": lambda w: [{"dp": 1, "tp": w, "pp": 1}] if w > 1 else [],
    "pipeline": lambda w: [{"dp": w // pp, "tp": 1, "pp": pp} for pp in range(w, 1, -1) if w % pp == 0],
}


def candidates(base: dict, strategy_knobs: dict[str, dict], ranks_per_node: int | None = None
               ) -> list[tuple[dict, str | None]]:
    """Every (config, why it cannot run or None) the plan asks for. `base` is the composed plan config,
    `strategy_knobs` each strategy's own group (conf/strategy/<name>.yaml); a world larger than
    `ranks_per_node` spans ceil(world / ranks_per_node) nodes of that many ranks."""
    plan = base["plan"]
    worlds = plan["world_sizes"] or [base["launch"]["nproc"]]
    out = []
    for world, name, checkpointing, accum in itertools.product(worlds, plan["strategies"],
                                                               plan["activation_checkpointing"], plan["grad_accum"]):
        for degrees in DEGREES[name](world):
            if name == "fsdp" and ranks_per_node and degrees["tp"] > ranks_per_node:
                continue  # FSDP's tensor-parallel group stays within a node (its collectives are per layer)
            cfg = layout_config(base, strategy_knobs[name], degrees, checkpointing, accum, ranks_per_node)
            out.append((cfg, refusal(cfg)))
    return out


def layout_config(base: dict, knobs: dict, degrees: dict, checkpointing: bool, accum: int,
                  ranks_per_node: int | None) -> dict:
    """The config `python -m bench` would run for one layout (the strategy's own keys `knobs`), its world of
    dp x tp x pp ranks over nodes of `ranks_per_node`."""
    world = degrees["dp"] * degrees["tp"] * degrees["pp"]
    cfg = copy.deepcopy(base)
    cfg.update(strategy=copy.deepcopy(knobs), parallel=dict(degrees), grad_accum=accum,
               activation_checkpointing=checkpointing, force=True, progress=False)
    nodes = -(-world // ranks_per_node) if ranks_per_node and world > ranks_per_node else 1
    cfg["launch"] = {**cfg["launch"], "name": "local", "nnodes": nodes, "nproc": world // nodes}
    return cfg


def refusal(cfg: dict) -> str | None:
    """Why `python -m bench` would refuse this config (its own checks, bar those of this machine's devices and
    of one machine's launcher: the plan may be for GPUs and nodes this machine lacks), or None."""
    launch = cfg["launch"]
    # the layout's checks, on one node: how the ranks are spread over machines changes none of them
    as_run = {**cfg, "launch": {**launch, "nnodes": 1, "nproc": launch["nnodes"] * launch["nproc"]}}
    if cfg["device"] == "cuda":
        as_run.update(device="cpu", backend="auto")
    try:
        validate(as_run)
        cfg["parallel"] = parallel_degrees(as_run)
    except ConfigError as exc:
        return str(exc)
    return None
