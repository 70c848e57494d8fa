"""torch's pipeline schedules as `strategy=pipeline` names them: which stages each rank holds, the schedule class,
and each schedule's idle time from its paper (`BUBBLE_FORMULAS`), for the strategy and the planner's simulation
(`bench.plan.pipeline`)."""

from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b", "interleaved", "interleaved_zb", "zbv", "dualpipev")
LOOPED = ("interleaved", "interleaved_zb")  # stage s on rank s % pp, stages_per_rank of them
V_SHAPED = ("zbv", "dualpipev")  # exactly 2 stages per rank: r and 2pp-1-r
ZERO_BUBBLE = ("interleaved_zb", *V_SHAPED)  # backward split into input and weight gradients
# The idle time of a step as a multiple of its compute, as each schedule's paper gives it for forward, input-gradient
# and weight-gradient passes of equal time (T_F = T_B = T_W): (pp-1)/m for GPipe and 1F1B, divided by v interleaved
# (Narayanan et al. 2021); ZB-H1 a third of 1F1B's, ZB-V 0 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023, and
# "Pipeline Parallelism with Controllable Memory", 2024); DualPipe (PP/2-1)(F&B+B-3W) = 0 (DeepSeek-V3 report, table
# 2). profile=true measures the idle time beside it.
BUBBLE_FORMULAS = {"gpipe": "(pp-1)/m", "1f1b": "(pp-1)/m", "interleaved": "(pp-1)/(v*m)",
                   "interleaved_zb": "(pp-1)/(3*v*m)", "zbv": "0", "dualpipev": "0"}


def stages_of(schedule: str, pp: int, rank: int, stages_per_rank: int) -> list[int]:
    """The stages pipeline rank `rank` holds, in order: looped (s on rank s % pp) or V-shaped (r and 2pp-1-r)."""
    if schedule in V_SHAPED:
        return [rank, 2 * pp - 1 - rank]
    return list(range(rank, pp * stages_per_rank, pp))


def idle_ratio(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> float:
    if pp == 1 or schedule in V_SHAPED:
        return 0.0
    ratio = (pp - 1) / (stages_per_rank * microbatches)
    return ratio / 3 if schedule == "interleaved_zb" else ratio


def schedule_class(name: str):
    from torch.distributed.pipelining import schedules

    return getattr(schedules, {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
                               "interleaved": "ScheduleInterleaved1F1B",
                               "interleaved_zb": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble",
                               "dualpipev": "ScheduleDualPipeV"}[name])


def microbatch_count(cfg: dict, dp: int) -> int:
    """Micro-batches per replica and step: `strategy.microbatches`, or with `strategy.microbatch_size` (Megatron's
    --micro-batch-size) the replica's batch over it."""
    size = cfg["strategy"].get("microbatch_size")
    return cfg["global_batch"] // dp // size if size else cfg["strategy"]["microbatches"]
