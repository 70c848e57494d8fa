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
    as a rank holds them at the least (`shares`), and `activations_mb(run)`. The weights and optimizer state are
    held throughout the step; the gradients, all of them at the end of the backward, and the activations before
    it (zero_grad sets the gradients to None): the larger of the two counts. (None, why, "") where the model
    cannot be built."""
    from bench.measure.memory import held_between_steps_mb
    from bench.models import meta_instance

    try:
        with no_large_tensors():
            held = held_between_steps_mb(meta_instance(run.config["model"]), run.config["optim"])
    except Exception as exc:
        return None, failure(exc), ""
    states = shares(run, held)
    held["activations"], activations = activations_mb(run)
    held["total"] = (held["params"] + held["buffers"] + held["optim"]
                     + max(held["grads"] + held["temp"], held["activations"]))
    return held | {"method": "bound"}, states, activations


def shares(run, held: dict) -> str:
    """Divide the weights' MiB as a rank holds them where the strategy declares it (one replica: its optimizer
    shards, DDP's gradient buckets; stage by stage: rank 0's blocks alone, divided over the stage's shards;
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
        held["params"] = block["params"] * blocks * (1 / how.shards_in_step + (1 / how.shards if gathered else 0))
        held["buffers"] /= world
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


def block_outputs_mb(run) -> tuple[float, str]:
    """Rank 0's share of the block outputs backward needs (a checkpointed block keeps its input, the previous
    one's output) for one micro-batch: one sample's largest (`bench.measure.memory.largest_block_output_bytes`) x
    blocks / (pp x tp) x the micro-batch; 0 where that forward fails on fake tensors too."""
    from bench.plan.activations import largest_block_output_bytes

    cfg, degrees = run.config, run.degrees
    micro = cfg["global_batch"] // degrees.dp // cfg["grad_accum"] // run.strategy.batch_unit(run)
    try:
        with quiet_fake_tensors():
            sample, blocks = largest_block_output_bytes(run)
    except Exception as exc:
        return 0.0, f"no activations (the forward fails too: {type(exc).__name__})"
    blocks /= degrees.pp * degrees.tp
    return sample * blocks * micro / 2**20, f"{blocks:g} block output(s) x {micro} sample(s) held for backward"
