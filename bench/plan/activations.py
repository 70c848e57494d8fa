"""The activations a rank holds for backward, at least, counted on fake tensors: the largest output of the model's
blocks, for the memory check's floor where the simulation fails (`bench.plan.bound.bound_mb`), and what one block
saves for backward, for the planner's floor of every layout (`activations_floor_mb`, `bench.plan.bound.floor_mb`)."""

from __future__ import annotations

from bench.measure.memory import no_large_tensors, quiet_fake_tensors


def largest_block_output_bytes(run) -> tuple[float, int]:
    """(The largest output of the model's blocks in one sample's forward, in bytes; how many blocks), the model
    built on the meta device, run on fake tensors under the run's autocast, the sample made fake (made for real,
    as `bench.models.model_sizes` makes it, it took 48 GiB at model.seq_len=2**31)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_leaves

    from bench.models import build_on_meta
    from bench.strategies.base import autocast_dtype

    sent: list[float] = []

    def output_bytes(_module, _inputs, out) -> None:
        sent.append(float(sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))))

    dtype = autocast_dtype(run.config["precision"])
    with no_large_tensors():
        model = build_on_meta(run.config["model"])
    with FakeTensorMode(allow_non_fake_inputs=True), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        module = run.materialize(model, "cpu")
        x, _ = run.model.synthetic_batch(run.config["model"], 1, torch.Generator().manual_seed(0))
        for block in run.model.blocks_of(module):
            block.register_forward_hook(output_bytes)
        with torch.no_grad():
            module(x)
    return max(sent, default=0.0), len(run.model.blocks_of(module))


def activations_floor_mb(run) -> tuple[float, str]:
    """Rank 0's activations at the least (a pipeline's first or last rank, the larger), in MiB, and how they were
    counted: what one block saves for backward (`one_block_bytes`; with checkpointing, each block's input, and
    one block's recompute) x the rank's blocks x the micro-batches it holds at once, and the model's outputs
    where it holds the last stage (a pipeline's, in its schedule's order: `microbatches_held`), all of it divided
    over the tensor-parallel ranks (some of it is whole on each: a floor). 0 where the forward fails on fake
    tensors."""
    cfg, degrees, how = run.config, run.degrees, run.strategy.memory(run)
    depth = run.model.depth(cfg["model"])
    if how.how == "stage by stage":
        from bench.plan.pipeline import microbatches_held
        from bench.strategies.schedules import microbatch_count

        moments = [m for rank in sorted({0, degrees.pp - 1}) for m in microbatches_held(run, rank)]
        blocks = depth // how.stages * (how.stages // degrees.pp)
        micro = cfg["global_batch"] // degrees.dp // microbatch_count(cfg, degrees.dp)
    else:
        moments, blocks = [(1, 1)], depth
        micro = cfg["global_batch"] // degrees.dp // cfg["grad_accum"] // run.strategy.batch_unit(run)
    try:
        with quiet_fake_tensors():
            one, two = one_block_bytes(run, 1), one_block_bytes(run, 2)
    except Exception as exc:
        return 0.0, f"no activations (one block's forward fails on fake tensors: {type(exc).__name__})"
    saved, block_out, model_out = (a + (micro - 1) * (b - a) for a, b in zip(one, two, strict=True))
    checkpointed = cfg["activation_checkpointing"]
    per_micro = blocks * (block_out if checkpointed else saved)
    total = max(held * per_micro + last * model_out for held, last in moments) + (saved if checkpointed else 0.0)
    what = "each block's input and one block recomputed" if checkpointed else "what each block saves for backward"
    held = max(held for held, _ in moments)
    return total / degrees.tp / 2**20, (f"activations: {what}, {blocks} block(s) x up to {held} micro-batch(es) "
                                         f"of {micro} sample(s), and the outputs the last stage holds"
                                         + (f", / tp {degrees.tp}" if degrees.tp > 1 else ""))


_ONE_BLOCK: dict[tuple, tuple[float, float, float]] = {}


def one_block_bytes(run, samples: int) -> tuple[float, float, float]:
    """(What one of the model's blocks saves for its backward in a forward of `samples` samples, the block's
    output, the model's output and what its loss saves), in bytes: the tensors autograd keeps
    (`saved_tensors_hooks`), each storage once, bar the weights and their casts (any tensor shaped like a
    parameter: a floor leaves out what it cannot tell apart), on fake tensors under the run's autocast, the model
    built with one block where it says how (`with_blocks`). Kept for the process: a plan asks it of every
    layout."""
    import json

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_leaves

    from bench.models import build_on_meta, loss_fn
    from bench.strategies.base import autocast_dtype

    spec, model_cfg = run.model, run.config["model"]
    key = (json.dumps(model_cfg, sort_keys=True, default=str), run.config["precision"], run.config["seed"], samples)
    if key in _ONE_BLOCK:
        return _ONE_BLOCK[key]
    if spec.with_blocks is not None:
        model_cfg = spec.with_blocks(model_cfg, 1)
    dtype = autocast_dtype(run.config["precision"])
    with no_large_tensors():
        model = build_on_meta(model_cfg)
    inside, weights, saved, out = [False], set(), {}, []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0] and tuple(t.shape) not in weights:
            saved[id(t.untyped_storage())] = t.untyped_storage()
        return t

    def leave(_module, _inputs, output) -> None:
        inside[0] = False
        out.append(float(sum(t.nbytes for t in tree_leaves(output) if isinstance(t, torch.Tensor))))

    with FakeTensorMode(allow_non_fake_inputs=True), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        module = run.materialize(model, "cpu")
        weights.update(tuple(p.shape) for p in module.parameters())
        block = spec.blocks_of(module)[0]
        block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
        block.register_forward_hook(leave)
        x, target = spec.synthetic_batch(model_cfg, samples, torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = module(x)
        block_saved = float(sum(s.nbytes() for s in saved.values()))
        outputs = {id(t.untyped_storage()): t.untyped_storage() for t in tree_leaves(output)
                   if isinstance(t, torch.Tensor)}
        saved.clear()
        inside[0] = True
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(output, target)  # the loss's own copies of the logits, held with them until backward
        held = outputs | saved
        _ONE_BLOCK[key] = block_saved, out[0], float(sum(s.nbytes() for s in held.values()))
    return _ONE_BLOCK[key]
