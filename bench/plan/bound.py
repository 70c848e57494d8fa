"""What rank 0 holds at the least, counted without a step: the memory check's floor where the simulation fails
(`bound_mb`), and the planner's test of a layout before it is simulated (`floor_mb`)."""

from __future__ import annotations

from bench.measure.memory import no_large_tensors, quiet_fake_tensors


def failure(exc: Exception) -> str:
    return f"{type(exc).__name__} on fake tensors: {str(exc).splitlines()[0] if str(exc) else ''}"


def bound_mb(run, not_simulated: str) -> tuple[dict | None, str]:
    """What rank 0 holds at the least, `method` "bound", counted without a step so that only the model's build can
    fail (no run starts without it either: then None): `held_at_least` with the block outputs backward needs
    (`block_outputs_mb`: a forward without gradients, which runs where a step cannot). A floor: a run that does
    not fit it cannot run."""
    held, states, activations = held_at_least(run, block_outputs_mb)
    if held is None:
        return None, f"{not_simulated}; no bound either: {states}"
    why = not_simulated.removeprefix("memory not predicted: ").rstrip(".")
    return held, f"{why}; the bound: {states}, {activations}"


def floor_mb(run) -> tuple[dict | None, str]:
    """(What rank 0 holds at the least, `method` "bound", and how it was counted): `held_at_least` with what one
    block saves for backward, counted for rank 0's blocks and micro-batches (`activations_floor_mb`). No step is
    run. A layout whose floor exceeds the device cannot fit: the planner does not simulate it. None where the
    model cannot be built."""
    from bench.plan.activations import activations_floor_mb

    held, states, activations = held_at_least(run, activations_floor_mb)
    return (None, states) if held is None else (held, f"{states}; {activations}")


def held_at_least(run, activations_mb) -> tuple[dict | None, str, str]:
    """(MiB by kind and `total`, `method` "bound"; how the weights are shared; how the activations were counted):
    the meta-device build's weights, gradients and optimizer state (`bench.measure.memory.held_between_steps_mb`)
    as a rank holds them at the least (`shares`), and the activations at each moment of the step
    (`activations_mb(run)`: MiB, the share of the gradients held with them, and the rank: a pipeline's first or
    last, which hold their stage's own layers too, `stage_ends`). The weights and optimizer state
    are held throughout the step; the gradients, all of them at the end of the backward, and, where the step
    accumulates them (micro-batches), with the activations of those after the first (zero_grad sets them to None
    before the step): the largest of those moments counts. (None, why, "") where the model cannot be built."""
    from bench.measure.memory import held_between_steps_mb
    from bench.models import meta_instance

    try:
        with no_large_tensors():
            held = held_between_steps_mb(meta_instance(run.config["model"]), run.config["optim"])
    except Exception as exc:
        return None, failure(exc), ""
    states = shares(run, held)
    ends = held.pop("ends", {})
    moments, activations = activations_mb(run)
    counted = [at_a_moment(held, ends.get(rank, {}), mb, share) for mb, share, rank in moments or [(0.0, 0.0, 0)]]
    return max(counted, key=lambda kinds: kinds["total"]) | {"method": "bound"}, states, activations


def at_a_moment(held: dict, end: dict, activations: float, gradient_share: float) -> dict:
    """What a rank holds at a moment of its step: its weights (`held`, and the pipeline's first or last stage's
    own layers, `end`: MiB by kind), `activations` MiB, and `gradient_share` of its blocks' gradients (all of its
    end's where it has them all). The gradients are held in full at the end of the backward (zero_grad sets them
    to None before the step's)."""
    kinds = {k: held[k] + end.get(k, 0.0) for k in ("params", "grads", "optim")}
    during = gradient_share * held["grads"] + (end.get("grads", 0.0) if gradient_share == 1.0 else 0.0)
    kinds |= {"buffers": held["buffers"], "temp": held["temp"], "activations": activations}
    kinds["total"] = (kinds["params"] + kinds["buffers"] + kinds["optim"]
                      + max(kinds["grads"] + kinds["temp"], activations + during))
    return kinds


def shares(run, held: dict) -> str:
    """Divide the weights' MiB as a rank holds them where the strategy declares it (one replica: its optimizer
    shards, DDP's gradient buckets; stage by stage: rank 0's blocks, divided over the stage's shards, and the
    first and last stage's own layers apart, in `ends`;
    simulated: over its shards, where it says them); else whole on one rank, and over the world at most (how
    tensor parallelism shards them only its simulation tells). Says which."""
    how, world = run.strategy.memory(run), run.world_size
    if how.how == "one replica":
        held["optim"] /= how.optimizer_shards
        held["temp"] += held["grads"] if how.gradient_buckets else 0.0  # the buckets' flat copy of the gradients
        return (f"weights and gradients whole, optimizer state over {how.optimizer_shards} rank(s)"
                + (", a flat copy of the gradients" if how.gradient_buckets else ""))
    if how.how == "stage by stage":
        from bench.measure.memory import held_between_steps_mb
        from bench.models import meta_instance

        module = meta_instance(run.config["model"])
        block = held_between_steps_mb(run.model.blocks_of(module)[0], run.config["optim"])
        blocks = len(run.model.blocks_of(module)) // how.stages * (how.stages // run.degrees.pp)
        held["optim"] = block["optim"] * blocks / how.shards
        held["grads"] = block["grads"] * blocks / how.shards_in_step
        gathered = how.shards != how.shards_in_step  # a sharded stage: its shard, and gathered for the step
        held["params"] = stage_weights(run, block["params"] * blocks, how, gathered)
        held["buffers"] /= world
        held["ends"] = stage_ends(run, module, how, gathered)
        return (f"rank 0's {blocks} block(s): optimizer state over {how.shards} rank(s), weights and gradients "
                f"over {how.shards_in_step} in the step")
    if world == 1:
        return "weights, gradients and optimizer state whole (one rank)"
    shards = how.shards or world
    for kind in ("params", "grads", "optim"):
        held[kind] /= shards
    if how.shards:
        return f"weights, gradients and optimizer state divided over {shards} ranks (the strategy's shards)"
    return f"weights, gradients and optimizer state divided over all {world} ranks (their sharding not simulated)"


def stage_ends(run, module, how, gathered: bool) -> dict[int, dict]:
    """The layers the first pipeline rank holds before its blocks and the last after them (the model's
    `PIPELINE_SPLIT`: a Llama's embedding; its norm and head), by rank: MiB by kind, shared as its blocks are, on
    as many tensor-parallel ranks as those at the least (whether the model's plan splits them is not asked). The
    last stage is on the last rank of a looped schedule, on the first of a V-shaped one (zbv, dualpipev)."""
    from bench.measure.memory import held_between_steps_mb
    from bench.strategies.schedules import stages_of

    knobs, pp = run.config["strategy"], run.degrees.pp
    split, optim = run.model.pipeline_split, run.config["optim"]
    last_stage = how.stages - 1
    last = next(r for r in range(pp) if last_stage in stages_of(knobs["schedule"], pp, r, knobs["stages_per_rank"]))
    ends: dict[int, dict] = {}
    for rank, paths in ((0, split.pre), (last, split.post)):
        for path in paths:
            part = held_between_steps_mb(module.get_submodule(path), optim)
            end = ends.setdefault(rank, dict.fromkeys(("params", "grads", "optim"), 0.0))
            end["optim"] += part["optim"] / how.shards
            end["grads"] += part["grads"] / how.shards_in_step
            end["params"] += stage_weights(run, part["params"], how, gathered)
    return ends


def stage_weights(run, params: float, how, gathered: bool) -> float:
    """A stage's weights (`params` MiB) on one rank: over its tensor ranks in the step, and where FSDP shards the
    stage, its shard besides. At 16-bit precision the gathered copy counts 2 bytes a parameter, as FSDP's mixed
    precision gathers it (counted at 4, a Llama 3 70B 64x4x2's floor was 102 GB, over its simulated 95)."""
    from bench.strategies.base import autocast_dtype

    if not gathered:
        return params / how.shards_in_step
    copy = 0.5 if autocast_dtype(run.config["precision"]) is not None else 1.0
    return params * (copy / how.shards_in_step + 1 / how.shards)


def block_outputs_mb(run) -> tuple[list[tuple[float, float]], str]:
    """Rank 0's share of the block outputs backward needs (a checkpointed block keeps its input, the previous
    one's output) for one micro-batch: one sample's largest (`bench.measure.memory.largest_block_output_bytes`) x
    blocks / (pp x tp) x the micro-batch; none where that forward fails on fake tensors too."""
    from bench.plan.activations import largest_block_output_bytes

    cfg, degrees = run.config, run.degrees
    micro = cfg["global_batch"] // degrees.dp // cfg["grad_accum"] // run.strategy.batch_unit(run)
    try:
        with quiet_fake_tensors():
            sample, blocks = largest_block_output_bytes(run)
    except Exception as exc:
        return [], f"no activations (the forward fails too: {type(exc).__name__})"
    blocks /= degrees.pp * degrees.tp
    held = sample * blocks * micro / 2**20
    return [(held, 0.0, 0)], f"{blocks:g} block output(s) x {micro} sample(s) held for backward"
