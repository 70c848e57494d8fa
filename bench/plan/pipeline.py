"""A pipeline's memory per rank, predicted on fake tensors (`bench.plan.memory` for the other strategies): each
rank's stages run their micro-batches in the schedule's order, holding what torch's schedules hold."""

from __future__ import annotations


def by_microbatches(run, whole: bool = False) -> dict:
    """`simulate_pipeline(run)`, or where the schedule runs many micro-batches (and not `whole`), simulated at a
    few counts of the same micro-batch (`microbatch_start`: from past the warm-up, one step apart) and
    extrapolated (`affine_in`): past its warm-up a schedule holds what one micro-batch more adds (its receive
    buffers; GPipe, its activations too), while a simulation's cost grows with the count (1F1B over 32
    micro-batches, most of a plan's time). `counts` says which."""
    from bench.plan.depth import affine_in
    from bench.strategies.schedules import microbatch_count

    cfg, dp, pp = run.config, run.degrees.dp, run.degrees.pp
    count, schedule = microbatch_count(cfg, dp), cfg["strategy"]["schedule"]
    micro = cfg["global_batch"] // dp // count
    start, step = microbatch_start(schedule, pp)

    def simulate_at(n: int) -> dict:
        knobs = {**cfg["strategy"], "microbatches": n}
        return simulate_pipeline(run.replace(global_batch=micro * dp * n, strategy=knobs))

    # three or four simulations from the warm-up on: worth it from about four times as many micro-batches
    found = None if whole or count < 4 * (start + 2 * step) else affine_in(simulate_at, start, step, count, count)
    if found is None:
        return simulate_pipeline(run)
    memory, counts = found
    return memory | {"counts": f"{', '.join(map(str, counts))} of {count} micro-batches, extrapolated"}


def by_microbatches_whole(run) -> dict:
    """Every micro-batch simulated (`predict(run, whole=True)`)."""
    return by_microbatches(run, whole=True)


def microbatch_start(schedule: str, pp: int) -> tuple[int, int]:
    """The fewest micro-batches past the schedule's warm-up that it accepts, and the step between counts it accepts:
    GPipe any, 1F1B at least pp; the looped and V-shaped schedules whole rounds of pp (DualPipeV at least two)."""
    if schedule == "gpipe":
        return 2, 1
    if schedule == "1f1b":
        return pp, 1
    return (2 * pp if schedule == "dualpipev" else pp), pp


def simulate_pipeline(run) -> dict | None:
    """Each pipeline rank on fake tensors, alone: its stages (one, or `stages_per_rank` looped ones: stage s on rank s
    mod pp), tensor-parallel and FSDP-sharded as the ranks make them (`bench.strategies.stage_sharding`) over a fake
    process group (`fake_world`), run their micro-batches' forwards and backwards in the schedule's order
    (`schedule_order`), with every activation a backward still needs held and the schedule's receive buffers for the
    step, then the optimizer step, under MemTracker; the largest rank's peak (the run's measurement is the largest
    rank's), each rank's moments with its `stages`, and the first rank's collectives (tensor parallelism's, FSDP's; the
    sends and an unsharded all-reduce are the strategy's to count). torch's schedule itself cannot run on fake tensors
    (its shape exchange reads values). With unsharded dp replicas, the flat buffer of their gradient all-reduce is held
    too (measured against runs: docs/plan-and-search.md)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.measure.memory import no_large_tensors, optimizer_state, peak_by_kind_mb
    from bench.models import build_on_meta
    from bench.parallel.optim import build_optimizer
    from bench.plan.collectives import CollectiveRecorder
    from bench.plan.fake import fake_world, real_mesh_tables
    from bench.rank.tracked_step import step_memory_tracker
    from bench.strategies import stage_sharding
    from bench.strategies.base import autocast_dtype, checkpoint_and_compile
    from bench.strategies.schedules import ZERO_BUBBLE, microbatch_count, stages_of
    from bench.strategies.stages import build_stages

    cfg = run.config
    knobs, pp, dp = cfg["strategy"], run.degrees.pp, run.degrees.dp
    per_rank, count = knobs["stages_per_rank"], microbatch_count(cfg, dp)
    sharded = stage_sharding.sharded(cfg, dp)
    micro = cfg["global_batch"] // dp // count
    schedule = knobs["schedule"]
    orders = torch_orders(schedule, pp, count, per_rank) if schedule in ZERO_BUBBLE else None  # its own group
    peaks, moments, traced = [], [], []
    with fake_world(run) as topo:
        mesh = topo.mesh()
        torch.manual_seed(cfg["seed"])
        with no_large_tensors():
            model = build_on_meta(cfg["model"])
        with FakeTensorMode(allow_non_fake_inputs=True), real_mesh_tables():
            model = checkpoint_and_compile(stage_sharding.tensor_parallel(model, mesh, run), run.replace(compile=False))
            stages = build_stages(model, run.model, pp * per_rank,
                                  autocast_dtype=None if sharded else autocast_dtype(cfg["precision"]))
            # only the simulated ranks' stages are made, and the first (what every later stage receives is shaped
            # as what it sends: blocks alike, as the depth extrapolation has it); a 64-stage pipeline made all 64
            needed = sorted({0} | {s for rank in peak_ranks(pp) for s in stages_of(schedule, pp, rank, per_rank)})
            for s in needed if sharded else ():
                stage_sharding.shard_stage(stages[s], mesh, run)
            # the micro-batch made fake: made for real, then converted, it took micro x seq_len tokens of memory
            x, target = run.model.synthetic_batch(cfg["model"], micro, torch.Generator().manual_seed(0))
            modules = {s: run.materialize(stages[s], torch.device("cpu")) for s in needed}
            with torch.no_grad():
                sent = modules[0](x)
            inputs = {s: x if s == 0 else sent.clone() for s in needed}  # what each stage receives, its own
            resharded(modules.values())
            for rank in peak_ranks(pp):
                mine = stages_of(schedule, pp, rank, per_rank)
                local = [modules[s] for s in mine]
                optimizer = build_optimizer([p for m in local for p in m.parameters()], cfg["optim"])
                order = orders[rank] if orders else numbered(schedule_order(schedule, pp, rank, count, per_rank))
                last = mine.index(len(stages) - 1) if len(stages) - 1 in mine else None
                optimizer_state([p for m in local for p in m.parameters()], optimizer)
                tracker = step_memory_tracker()
                tracker.track_external(*local, optimizer)
                work = (local, optimizer, [inputs[s] for s in mine], target, last, order, count,
                        1 if sharded else dp, tracker.mark)
                with CollectiveRecorder(run.world_size) as recorder, tracker:
                    run_rank(*work)
                peaks.append(peak_by_kind_mb(tracker.get_tracker_snapshot("peak")))
                moments += [peak_by_kind_mb(m) | {"stages": mine} for m in tracker.moments]  # the ranks' in turn
                traced.append(recorder.as_list())
    return max(peaks, key=lambda kinds: kinds["total"]) | {"collectives": traced[0], "moments": moments}


def microbatches_held(run, rank: int) -> list[tuple[int, int, float]]:
    """After each work item of pipeline rank `rank`, in its schedule's order: the micro-batches whose activations
    it holds over its stages (from a stage's forward of one to its backward, a zero-bubble schedule's
    input-gradient pass), of them the last stage's (whose outputs, the model's, are held with them), and the
    share of its stages whose weights' gradients it holds by then (from a stage's first backward, or weight pass,
    to the step's end: a pipeline accumulates them over its micro-batches)."""
    from bench.strategies.schedules import ZERO_BUBBLE, microbatch_count, stages_of

    cfg = run.config
    knobs, pp = cfg["strategy"], run.degrees.pp
    count, per_rank, schedule = microbatch_count(cfg, run.degrees.dp), knobs["stages_per_rank"], knobs["schedule"]
    order = torch_orders(schedule, pp, count, per_rank)[rank] if schedule in ZERO_BUBBLE else \
        numbered(schedule_order(schedule, pp, rank, count, per_rank))
    mine = stages_of(schedule, pp, rank, per_rank)
    last = mine.index(pp * per_rank - 1) if pp * per_rank - 1 in mine else None
    held: set[tuple[int, int]] = set()
    with_gradients: set[int] = set()
    moments = []
    for work, stage, micro in order:
        if work == "F":
            held.add((stage, micro))
        else:
            held.discard((stage, micro))  # B, I: its activations are used; W runs on what I kept
            with_gradients |= {stage} if work in ("B", "W") else set()
        moments.append((len(held), sum(k == last for k, _ in held), len(with_gradients) / per_rank))
    return moments


def resharded(modules) -> None:
    """FSDP's units back to their shards, as a step finds them (a forward without resharding leaves them whole)."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for unit in module.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()


def peak_ranks(pp: int) -> list[int]:
    """The pipeline ranks whose peak can be the largest: the first (the embedding, and the most micro-batches in
    flight in every schedule here: a middle rank holds fewer of the same blocks) and the last (the head and its
    logits). Every rank of a pipeline of up to 4 checked: docs/plan-and-search.md."""
    return sorted({0, pp - 1})


def schedule_order(schedule: str, pp: int, rank: int, count: int, per_rank: int = 1) -> list[tuple[str, int]]:
    """A rank's micro-batch work in order: ("F" forward or "B" backward, which of its stages). GPipe runs every
    forward first; 1F1B runs pp - rank - 1 forwards, then alternates, then drains; interleaved 1F1B as torch's
    `ScheduleInterleaved1F1B` orders it (`_calculate_single_rank_operations`, torch 2.6-2.13): warm-up forwards,
    (v - 1) x m/rounds plus 2 per rank from the last, then forward-backward pairs, then the backwards left, the
    forwards cycling through the rank's stages a round of micro-batches at a time, the backwards in reverse."""
    if schedule == "gpipe":
        return [("F", 0)] * count + [("B", 0)] * count
    if schedule == "1f1b":
        warmup = min(pp - rank - 1, count)
        return [("F", 0)] * warmup + [("F", 0), ("B", 0)] * (count - warmup) + [("B", 0)] * warmup
    per_round = count // max(1, count // pp)
    ops = count * per_rank
    warmup = min((per_rank - 1) * per_round + 2 * (pp - 1 - rank), ops)

    def forward(op: int) -> tuple[str, int]:
        return "F", (op // per_round) % per_rank

    def backward(op: int) -> tuple[str, int]:
        return "B", per_rank - 1 - ((op - warmup) // per_round) % per_rank

    return ([forward(op) for op in range(warmup)]
            + [w for op in range(warmup, ops) for w in (forward(op), backward(op))]
            + [backward(op) for op in range(ops, ops + warmup)])


def numbered(order: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """(work, stage) in order -> (work, stage, micro-batch): each stage's n-th forward and n-th backward are its
    n-th micro-batch's."""
    seen: dict[tuple[str, int], int] = {}
    out = []
    for work, k in order:
        out.append((work, k, seen.get((work, k), 0)))
        seen[(work, k)] = out[-1][2] + 1
    return out


def torch_orders(schedule: str, pp: int, count: int, per_rank: int) -> dict[int, list[tuple[str, int, int]]]:
    """Every pipeline rank's work as torch's own schedule orders it (`pipeline_order`, which its constructor computes
    for all ranks): (F forward, B whole backward, I input gradient, W weight gradient; the rank's stage, by its
    index among the rank's stages; the micro-batch), DualPipeV's overlapped forward-backward pairs taken one after
    the other. The schedule is made over a fake process group of pp ranks, for stand-in stages on the meta device."""
    import torch
    from torch import nn
    from torch.distributed.pipelining import PipelineStage

    from bench.plan.fake import fake_process_group
    from bench.strategies.schedules import schedule_class, stages_of

    kinds = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}
    with fake_process_group(pp):
        stages = [PipelineStage(nn.Linear(1, 1, device="meta"), s, pp * per_rank, torch.device("cpu"))
                  for s in stages_of(schedule, pp, 0, per_rank)]
        order = schedule_class(schedule)(stages, n_microbatches=count, loss_fn=lambda out, target: out).pipeline_order
    out = {}
    for rank in range(pp):
        mine = stages_of(schedule, pp, rank, per_rank)
        actions = [a for action in order[rank] if action is not None
                   for a in (getattr(action, "sub_actions", None) or [action])]
        out[rank] = [(kinds[a.computation_type.name], mine.index(a.stage_index), a.microbatch_index)
                     for a in actions if a.computation_type.name in kinds]
    return out


def run_rank(modules, optimizer, received, target, last: int | None, order: list[tuple[str, int, int]], count: int,
             dp: int, mark=lambda: None) -> None:
    """One step of one pipeline rank: its stages' work in `order` ((work, stage, micro-batch)), each backward fed
    a gradient shaped like its output (the next stage's); the last stage (`last`, its index among `modules`)
    computes each micro-batch's loss in its forward and holds it until its backward, as torch's schedules do; then
    the optimizer step. A zero-bubble schedule's input-gradient pass (I) and weight-gradient pass (W) run torch's
    own (`stage_backward_input`, `stage_backward_weight`): between them, the gradients W needs are held as torch
    holds them. `mark()` is called as each work item starts, and the step's end (the tracker's phases)."""
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    from bench.models import loss_fn
    from bench.strategies.stage_sharding import local_tensor

    sharded = [m for m in modules if isinstance(m, FSDPModule)]
    for module in sharded:  # as torch's stage sets them for every backward but the step's last reduction
        module.set_is_last_backward(False)
        module.set_reshard_after_backward(False)
        module.set_requires_gradient_sync(False)
    held: list[dict] = [{} for _ in modules]
    weight_work: list[dict] = [{} for _ in modules]  # micro-batch -> what its W pass needs, from its I pass
    optimizer.zero_grad(set_to_none=True)
    # the schedule's receive buffers, one per micro-batch and stage for the step: its inputs (the first stage's
    # chunks of the batch too), and the gradients of its outputs where another stage sends them
    inputs = [[r.detach().clone() for _ in range(count)] for r in received]
    grads = [None if k == last else [] for k in range(len(modules))]
    for work, k, mb in order:
        mark()
        if work == "F":
            inp = inputs[k][mb].requires_grad_(received[k].is_floating_point())
            inputs[k][mb] = None
            out = modules[k](inp)
            if grads[k] is not None and not grads[k]:
                grads[k] = [torch.empty_like(out) for _ in range(count)]
            # the schedule keeps each micro-batch's output until its backward, and the last stage's loss too
            held[k][mb] = (inp, out, loss_fn(out, target) / count if k == last else None)
            continue
        if work == "W":
            stage_backward_weight(modules[k].parameters(), weight_work[k].pop(mb))
            continue
        inp, out, loss = held[k].pop(mb)
        root, grad = (loss, None) if k == last else (out, grads[k][mb])
        if work == "I":
            _, weight_work[k][mb] = stage_backward_input([root], None if grad is None else [grad], [inp],
                                                         modules[k].parameters())
        else:
            root.backward(grad)
        if grad is not None:
            grads[k][mb] = None
    mark()
    for module in sharded:
        reduce_gradients(module)
    if dp > 1:  # the replicas' gradients averaged in one flat buffer (`PipelineParallel.sync_gradients`)
        torch.cat([local_tensor(p.grad).reshape(-1) for m in modules for p in m.parameters() if p.grad is not None])
    optimizer.step()


def reduce_gradients(module) -> None:
    """What torch's stage does after a step's last backward for an FSDP stage (`perform_reduce_grad`): every unit's
    gradients reduce-scattered, its parameters resharded."""
    from torch.distributed.fsdp import fully_shard

    module.set_is_last_backward(True)
    module.set_reshard_after_backward(True)
    module.set_requires_gradient_sync(True)
    state = fully_shard.state(module)
    for unit in state._state_ctx.all_states:
        for group in unit._fsdp_param_groups:
            group.post_backward()
    state._root_post_backward_final_callback()
