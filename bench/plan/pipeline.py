"""A pipeline's memory per rank, predicted on fake tensors (`bench.plan.memory` for the other strategies): each
rank's stages run their micro-batches in the schedule's order, holding what torch's schedules hold."""

from __future__ import annotations


def simulate_pipeline(run) -> dict | None:
    """Each pipeline rank on fake tensors, alone: its stages (one, or `stages_per_rank` looped ones: stage s on
    rank s % pp) run their micro-batches' forwards and backwards in the schedule's order (`schedule_order`),
    with every activation a backward still needs held and the schedule's receive buffers for the step, then the
    optimizer step, under MemTracker; the largest rank's peak (the run's measurement is the largest rank's).
    torch's schedule itself cannot run on fake tensors (its shape exchange reads values). With dp replicas, the
    flat buffer of their gradient all-reduce is held too (measured against runs: docs/plan-and-search.md)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.measure.memory import no_large_tensors, peak_by_kind_mb
    from bench.models import build_on_meta
    from bench.parallel.optim import build_optimizer
    from bench.rank.train import step_memory_tracker
    from bench.strategies.base import autocast_dtype, checkpoint_and_compile
    from bench.strategies.stages import build_stages

    cfg = run.config
    knobs, pp, dp = cfg["strategy"], run.degrees.pp, run.degrees.dp
    per_rank, count = knobs["stages_per_rank"], knobs["microbatches"]
    micro = cfg["global_batch"] // dp // count
    torch.manual_seed(cfg["seed"])
    with no_large_tensors():
        model = checkpoint_and_compile(build_on_meta(cfg["model"]), run.replace(compile=False))
    stages = build_stages(model, run.model, pp * per_rank, autocast_dtype=autocast_dtype(cfg["precision"]))
    peaks = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        # the micro-batch made fake: made for real, then converted, it took micro x seq_len tokens of memory
        x, target = run.model.synthetic_batch(cfg["model"], micro, torch.Generator().manual_seed(0))
        modules = [run.materialize(stage, torch.device("cpu")) for stage in stages]
        inputs, h = [], x
        with torch.no_grad():
            for module in modules:  # what each stage receives
                inputs.append(h)
                h = module(h)
        for rank in range(pp):
            mine = list(range(rank, pp * per_rank, pp))  # looped: stage s on rank s % pp
            local = [modules[s] for s in mine]
            optimizer = build_optimizer([p for m in local for p in m.parameters()], cfg["optim"])
            order = schedule_order(knobs["schedule"], pp, rank, count, per_rank)
            last = mine.index(len(modules) - 1) if mine[-1] == len(modules) - 1 else None
            work = (local, optimizer, [inputs[s] for s in mine], target, last, order, count, dp)
            run_rank(*work)  # the optimizer's state
            tracker = step_memory_tracker()
            tracker.track_external(*local, optimizer)
            with tracker:
                run_rank(*work)
            peaks.append(peak_by_kind_mb(tracker.get_tracker_snapshot("peak")))
    return max(peaks, key=lambda kinds: kinds["total"]) | {"collectives": []}


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


def run_rank(modules, optimizer, received, target, last: int | None, order: list[tuple[str, int]], count: int,
             dp: int) -> None:
    """One step of one pipeline rank: its stages' forwards and backwards in `order`, each backward fed a gradient
    shaped like its output (the next stage's); the last stage (`last`, its index among `modules`) computes each
    micro-batch's loss in its forward and holds it until its backward, as torch's schedules do; then the
    optimizer step."""
    import torch

    from bench.models import loss_fn

    held: list[list] = [[] for _ in modules]
    optimizer.zero_grad(set_to_none=True)
    # the schedule's receive buffers, one per micro-batch and stage for the step: its inputs (the first stage's
    # chunks of the batch too), and the gradients of its outputs where another stage sends them
    inputs = [[r.detach().clone() for _ in range(count)] for r in received]
    grads = [None if k == last else [] for k in range(len(modules))]
    for work, k in order:
        if work == "F":
            inp = inputs[k].pop(0).requires_grad_(received[k].is_floating_point())
            out = modules[k](inp)
            if grads[k] is not None and not grads[k]:
                grads[k] = [torch.empty_like(out) for _ in range(count)]
            # the schedule keeps each micro-batch's output until its backward, and the last stage's loss too
            held[k].append((out, loss_fn(out, target) / count if k == last else None))
        else:
            out, loss = held[k].pop(0)
            loss.backward() if k == last else out.backward(grads[k].pop(0))
    if dp > 1:  # the replicas' gradients averaged in one flat buffer (`PipelineParallel.sync_gradients`)
        flat = torch.cat([p.grad.reshape(-1) for m in modules for p in m.parameters() if p.grad is not None])
        del flat
    optimizer.step()
