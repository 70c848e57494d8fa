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


def activations_floor_mb(run) -> tuple[list[tuple[float, float, int]], str]:
    """Rank 0's activations at the least at each moment of its step (a pipeline's first and last rank), in MiB,
    with the share of the weights' gradients held with them (`bench.plan.bound.held_at_least` adds those) and
    the rank; and how they were counted: what one block saves for backward (`one_block_bytes`; with
    checkpointing, each block's input) x the rank's blocks x the micro-batches it holds, and the model's outputs
    where it holds the last stage, or with checkpointing one block's recompute where that is more (the one is
    freed before the other: a 70B Llama's FSDP floor held both, over its simulated peak); a pipeline's in its
    schedule's order (`microbatches_held`), gradient accumulation's with the gradients of the micro-batches
    before; on one tensor-parallel rank. No moment where the forward fails on fake tensors."""
    cfg, degrees, how = run.config, run.degrees, run.strategy.memory(run)
    depth = run.model.depth(cfg["model"])
    if how.how == "stage by stage":
        from bench.plan.pipeline import microbatches_held
        from bench.strategies.schedules import microbatch_count

        moments = [(*m, rank) for rank in sorted({0, degrees.pp - 1}) for m in microbatches_held(run, rank)]
        blocks = depth // how.stages * (how.stages // degrees.pp)
        micro = cfg["global_batch"] // degrees.dp // microbatch_count(cfg, degrees.dp)
    else:
        moments, blocks = [(1, 1, 0.0, 0)] + ([(1, 1, 1.0, 0)] if cfg["grad_accum"] > 1 else []), depth
        micro = cfg["global_batch"] // degrees.dp // cfg["grad_accum"] // run.strategy.batch_unit(run)
    try:
        with quiet_fake_tensors():
            one, two = one_block_bytes(run, 1), one_block_bytes(run, 2)
    except Exception as exc:
        return [], f"no activations (one block's forward fails on fake tensors: {type(exc).__name__})"
    # a context-parallel rank's tensors are each at least 1/cp of the whole sequence's (its K/V all-gathered: more)
    saved, block_out, model_out = ((a + (micro - 1) * (b - a)) / degrees.cp for a, b in zip(one, two, strict=True))
    checkpointed = cfg["activation_checkpointing"]
    per_micro = blocks * (block_out if checkpointed else saved)
    recompute = saved if checkpointed else 0.0
    counted = [((held * per_micro + max(last * model_out, recompute)) / 2**20, gradients, rank)
               for held, last, gradients, rank in moments]
    what = "each block's input and one block recomputed" if checkpointed else "what each block saves for backward"
    held = max(held for held, _, _, _ in moments)
    return counted, (f"activations: {what}, {blocks} block(s) x up to {held} micro-batch(es) of {micro} "
                     "sample(s), and the outputs the last stage holds"
                     + (f", on one of {degrees.tp} tensor-parallel ranks" if degrees.tp > 1 else "")
                     + (f", 1/{degrees.cp} of each sequence" if degrees.cp > 1 else ""))


_ONE_BLOCK: dict[tuple, tuple[float, float, float]] = {}


def one_block_bytes(run, samples: int) -> tuple[float, float, float]:
    """(What one of the model's blocks saves for its backward in a forward of `samples` samples, the block's
    output, the model's output and what its loss saves), in bytes on one tensor-parallel rank: the tensors
    autograd keeps (`saved_tensors_hooks`), each storage once (a DTensor's, its rank's shard), bar the weights,
    their views and casts (`of_a_weight`), on fake tensors. The model is built with one block where it says how
    (`with_blocks`), and split over the tp ranks of a fake process group by its own plan, as the run splits it:
    what stays whole on every rank (a Llama's logits, gathered for its loss) counts whole. At 16-bit precision
    each count is the smaller of the model under autocast and the model cast to 16 bits, as FSDP's mixed
    precision runs it: its blocks' inputs, and so what they save, are 16-bit where autocast keeps the residual
    stream fp32 (a Llama 405B's FSDP 256x2x1 floor, counted under autocast only, was 80 GB over its simulated
    62 GB). Kept for the process: a plan asks it of every layout."""
    import json

    from bench.strategies.base import autocast_dtype

    sequence_parallel = run.config["strategy"].get("sequence_parallel", False)
    key = (json.dumps(run.config["model"], sort_keys=True, default=str), run.config["precision"], run.config["seed"],
           samples, run.degrees.tp, sequence_parallel)
    if key not in _ONE_BLOCK:
        casts = (False, True) if autocast_dtype(run.config["precision"]) is not None else (False,)
        counts = [counted_once(run, samples, cast) for cast in casts]
        _ONE_BLOCK[key] = tuple(min(each) for each in zip(*counts, strict=True))
    return _ONE_BLOCK[key]


def counted_once(run, samples: int, cast: bool) -> tuple[float, float, float]:
    """`one_block_bytes`' count, the model under the run's autocast, or (`cast`) cast to its 16-bit dtype."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import DeviceMesh
    from torch.utils._pytree import tree_leaves

    from bench.models import build_on_meta, loss_fn
    from bench.plan.fake import fake_process_group, real_mesh_tables
    from bench.strategies.base import autocast_dtype
    from bench.strategies.stage_sharding import tensor_parallel

    spec, model_cfg, tp = run.model, run.config["model"], run.degrees.tp
    if spec.with_blocks is not None:
        model_cfg = spec.with_blocks(model_cfg, 1)
    one = run.replace(model=model_cfg)
    dtype = autocast_dtype(run.config["precision"])
    with no_large_tensors():
        model = build_on_meta(model_cfg)
    if cast:
        model.to(dtype)  # on the meta device: fake parameters cannot be swapped for their casts
    inside, saved, out = [False], {}, []

    def storage(t: torch.Tensor):
        return getattr(t, "_local_tensor", t).untyped_storage()  # a DTensor's: its shard's

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0] and not of_a_weight(t):
            saved[id(storage(t))] = storage(t)
        return t

    def leave(_module, _inputs, output) -> None:
        inside[0] = False
        out.append(float(sum(storage(t).nbytes() for t in tree_leaves(output) if isinstance(t, torch.Tensor))))

    with fake_process_group(tp), FakeTensorMode(allow_non_fake_inputs=True), real_mesh_tables(), \
            torch.autocast("cpu", dtype=dtype, enabled=dtype is not None and not cast):
        if tp > 1:
            tensor_parallel(model, DeviceMesh("cpu", list(range(tp)), mesh_dim_names=("tp",)), one)
        module = one.materialize(model, "cpu")
        block = spec.blocks_of(module)[0]
        block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
        block.register_forward_hook(leave)
        x, target = spec.synthetic_batch(model_cfg, samples, torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = module(x)
        block_saved = float(sum(s.nbytes() for s in saved.values()))
        outputs = {id(storage(t)): storage(t) for t in tree_leaves(output) if isinstance(t, torch.Tensor)}
        saved.clear()
        inside[0] = True
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(output, target)  # the loss's own copies of the logits, held with them until backward
        held = outputs | saved
        return block_saved, out[0], float(sum(s.nbytes() for s in held.values()))


def of_a_weight(t) -> bool:
    """Whether a tensor autograd saves is a weight (a leaf that requires its gradient: the batch does not), or a
    view or cast of one (a chain of `VIEWS_AND_CASTS` back to a weight's AccumulateGrad). A test by shape
    misread a Llama's activations at one sample as its tensor-parallel weights' shards (2,048 x 8,192 both)."""
    fn = t.grad_fn
    if fn is None:
        return t.requires_grad
    while type(fn).__name__ in VIEWS_AND_CASTS:
        inputs = [f for f, _ in fn.next_functions if f is not None]
        if len(inputs) != 1:
            return False
        fn = inputs[0]
        if type(fn).__name__ == "AccumulateGrad":
            return True
    return False


VIEWS_AND_CASTS = {"ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0",
                   "UnsafeViewBackward0", "ExpandBackward0", "AliasBackward0", "ReshapeAliasBackward0"}
