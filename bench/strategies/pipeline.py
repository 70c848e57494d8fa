"""Pipeline parallelism: the model cut at block boundaries into stages, one stage per pipeline rank
(`parallel.pp`; interleaved schedules: `strategy.stages_per_rank` each), run by `torch.distributed.pipelining`'s
schedule (`strategy.schedule`) over `strategy.microbatches` micro-batches of each replica's batch:
- gpipe, 1f1b: one stage per rank;
- interleaved (1F1B), interleaved_zb (zero bubble, ZB-H1's order interleaved): stages looped, s on rank s % pp;
- zbv (ZB-V), dualpipev (DeepSeek-V3's DualPipe on a V): two stages per rank in a V, rank r holding stages r
  and 2pp-1-r.
The zero-bubble schedules split each backward into its input gradient (sent upstream at once) and its weight
gradient (run later, in what would be the bubble).
With `parallel.dp > 1` it is 2-D: every stage's gradients are averaged over its "dp" sub-mesh (the ranks
holding the same stage in the other replicas). The in-process split over one process's devices is
`strategy=modelparallel`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from bench.errors import positive_int, reject
from bench.models import loss_fn
from bench.parallel.topology import Degrees, Topology, parallel_degrees
from bench.strategies import Memory, collective, stage_by_stage
from bench.strategies.base import Parallel, autocast_dtype, checkpoint_and_compile, optimizer_for, unwrap
from bench.strategies.stages import bubble_fraction, build_stages, check_splittable, stage_block_ids

PARITY = "model"
DEGREES = {"dp", "pp"}
MODEL_NEEDS = {"pipeline_split"}
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


def check(cfg: dict) -> None:
    knobs = cfg["strategy"]
    if knobs["schedule"] not in SCHEDULES:
        reject("strategy.schedule", f"one of {', '.join(SCHEDULES)}", knobs["schedule"])
    positive_int(cfg, "strategy.microbatches")
    positive_int(cfg, "strategy.stages_per_rank")
    if cfg["grad_accum"] != 1:
        reject("grad_accum", "1 with strategy=pipeline (the schedule's micro-batches already split the batch: set "
               "strategy.microbatches instead)", cfg["grad_accum"])
    if cfg["precision"] == "fp16":
        reject("precision", "fp32 or bf16 with strategy=pipeline (the schedule runs backward itself, so fp16 loss "
               "scaling and a found-inf check agreed across stages are not wired in)", "fp16",
               "; or use strategy=modelparallel, which supports fp16")
    degrees = parallel_degrees(cfg)
    dp, pp, spr, mb = degrees["dp"], degrees["pp"], knobs["stages_per_rank"], knobs["microbatches"]
    schedule = knobs["schedule"]
    if schedule == "interleaved" and spr < 2:
        reject("strategy.stages_per_rank", "at least 2 with strategy.schedule=interleaved (interleaved 1F1B "
               "loops over several stages per rank)", spr)
    if schedule in V_SHAPED and spr != 2:
        reject("strategy.stages_per_rank", f"2 with strategy.schedule={schedule} (two stages per rank, in a V)", spr)
    if schedule not in (*LOOPED, *V_SHAPED) and spr != 1:
        reject("strategy.stages_per_rank", f"1 with strategy.schedule={schedule} (one stage per rank)", spr,
               "; or set strategy.schedule=interleaved")
    if schedule in ZERO_BUBBLE and cfg["compile"]:
        reject("compile", f"false with strategy.schedule={schedule} (torch's zero-bubble schedules split backward "
               "into input and weight gradients, which they do not support under torch.compile)", True)
    if schedule in ZERO_BUBBLE and cfg["activation_checkpointing"]:
        # torch 2.13: the weight pass recomputes a checkpointed block a second time, and the checkpoint's
        # recompute context cannot be entered twice (AttributeError: '_GeneratorContextManager' object has no
        # attribute 'args'), on every rank
        reject("activation_checkpointing", f"false with strategy.schedule={schedule} (torch's zero-bubble "
               "schedules recompute a checkpointed block in both halves of its backward, which fails)", True)
    if schedule == "dualpipev" and mb < 2 * pp:
        reject("strategy.microbatches", f"at least the number of stages 2 x parallel.pp = {2 * pp} with "
               "strategy.schedule=dualpipev", mb)
    key, got = ("strategy.stages_per_rank", spr) if spr > 1 else ("parallel.pp", pp)
    check_splittable(cfg, pp * spr, key, got, f" (parallel.pp={pp} x strategy.stages_per_rank={spr} stages); or "
                     "run fewer ranks (launch.nproc)")
    batch = cfg["global_batch"]
    if batch % (dp * mb):
        reject("strategy.microbatches", f"a divisor of the per-replica batch (global_batch={batch} / parallel.dp="
               f"{dp}) so that global_batch is divisible by dp x microbatches", mb, "; or change global_batch")
    if schedule == "1f1b" and mb < pp:
        reject("strategy.microbatches", f"at least the number of stages ({pp}) with strategy.schedule=1f1b", mb)
    if schedule in LOOPED:
        rounds = max(1, mb // pp)
        if mb % rounds:
            reject("strategy.microbatches", f"a multiple of the rounds max(1, microbatches // pp) = {rounds} with "
                   f"strategy.schedule={schedule} (e.g. a multiple of parallel.pp={pp})", mb)


def layouts(world: int, ranks_per_node: int | None) -> list[Degrees]:
    """Every pipeline of pp >= 2 stages dividing the world, replicated dp = world / pp times."""
    return [Degrees(dp=world // pp, pp=pp) for pp in range(world, 1, -1) if world % pp == 0]


def memory(run) -> Memory:
    """Each pipeline rank's stages, run in the schedule's order on fake tensors (`bench.plan.pipeline`): torch's
    schedule itself cannot run on them (its shape exchange reads values)."""
    return stage_by_stage(run.degrees.pp * run.config["strategy"]["stages_per_rank"])


def collectives(run, sizes) -> list[dict]:
    """Each of the rank's stages (stages_per_rank of them, looped) sends an activation forward and a gradient back
    per micro-batch; with replicas, a stage's gradients in one flat all-reduce after the schedule."""
    knobs, degrees = run.config["strategy"], run.degrees
    out = []
    if degrees.pp > 1 and sizes.boundary_bytes_per_sample:
        micro, stages = knobs["microbatches"], knobs["stages_per_rank"]
        per_micro = sizes.boundary_bytes_per_sample * run.config["global_batch"] // degrees.dp // micro
        sends = 2 * micro * stages
        out.append(collective("p2p", 2, sends, sends * per_micro))
    if degrees.dp > 1:
        # a stage's replicas are pp ranks apart (dp-major layout, bench.parallel.topology)
        out.append(collective("all_reduce", degrees.dp, 1, 4.0 * sizes.params / degrees.pp,
                              span=(degrees.dp - 1) * degrees.pp + 1))
    return out


def stages_of(schedule: str, pp: int, rank: int, stages_per_rank: int) -> list[int]:
    """The stages pipeline rank `rank` holds, in order: looped (s on rank s % pp) or V-shaped (r and 2pp-1-r)."""
    if schedule in V_SHAPED:
        return [rank, 2 * pp - 1 - rank]
    return list(range(rank, pp * stages_per_rank, pp))


def bubble(run) -> float:
    """The schedule's idle time as a multiple of its compute (`BUBBLE_FORMULAS`, from each schedule's paper)."""
    pp = run.degrees.pp
    knobs = run.config["strategy"]
    return idle_ratio(knobs["schedule"], pp, knobs["microbatches"], knobs["stages_per_rank"])


def idle_ratio(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> float:
    if pp == 1 or schedule in V_SHAPED:
        return 0.0
    ratio = (pp - 1) / (stages_per_rank * microbatches)
    return ratio / 3 if schedule == "interleaved_zb" else ratio


def batch_unit(run) -> int:
    return run.config["strategy"]["microbatches"]


@dataclass
class PipelineParallel(Parallel):
    """This rank's stages and the schedule that runs them; `forward_backward` is one schedule step."""

    stages: list[nn.Module] = field(default_factory=list)  # this rank's stage modules
    schedule: object = None
    dp_group: object = None  # with dp > 1: the ranks holding the same stages in the other replicas
    has_first: bool = False
    has_last: bool = False
    step_kwargs: dict = field(default_factory=dict)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        args = (x,) if self.has_first else ()
        if self.has_last:
            losses: list[torch.Tensor] = []
            self.schedule.step(*args, target=y, losses=losses, **self.step_kwargs)
            self.sync_gradients()
            # Each micro-batch's loss is its mean; the micro-batches are equal, so their mean is the batch's.
            return torch.stack([loss.detach().float() for loss in losses]).mean()
        self.schedule.step(*args, **self.step_kwargs)
        self.sync_gradients()
        return torch.zeros((), device=x.device)

    def sync_gradients(self) -> None:
        """2-D: average this rank's gradients over its dp group, one flat all-reduce after the schedule.

        Not DDP: the schedule runs each stage's backward itself, micro-batch by micro-batch, and DDP's
        bucket rebuilding fails under it on torch 2.13 (reducer.cpp "rebuilt parameter indices size is not
        same as original model parameters size"). The price: no overlap of this all-reduce with backward."""
        if self.dp_group is None:
            return
        grads = [p.grad for stage in self.stages for p in stage.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        flat.div_(self.topo.dp)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def full_parameters(self) -> dict[str, torch.Tensor] | None:
        """Every stage's parameters of the first replica, gathered to rank 0 (collective on all ranks)."""
        local = {}
        if self.topo.dp_rank == 0:
            for stage in self.stages:
                local.update({n: p.detach().cpu().clone() for n, p in unwrap(stage).named_parameters()})
        gathered = [None] * self.topo.world_size if self.topo.rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if self.topo.rank != 0:
            return None
        return {name: t for part in gathered for name, t in part.items()}


def schedule_class(name: str):
    from torch.distributed.pipelining import schedules

    return getattr(schedules, {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
                               "interleaved": "ScheduleInterleaved1F1B",
                               "interleaved_zb": "ScheduleInterleavedZeroBubble", "zbv": "ScheduleZBVZeroBubble",
                               "dualpipev": "ScheduleDualPipeV"}[name])


def apply(model: nn.Module, topo: Topology, run) -> Parallel:
    from torch.distributed.pipelining import PipelineStage

    cfg = run.config
    knobs = cfg["strategy"]
    spr, mb = knobs["stages_per_rank"], knobs["microbatches"]
    n_stages = topo.pp * spr
    model = checkpoint_and_compile(model, run)  # in place on the full model's blocks, before the split
    all_stages = build_stages(model, run.model, n_stages, autocast_dtype=autocast_dtype(cfg["precision"]),
                              device_type=topo.device_type)
    mesh = topo.mesh()
    pp_group = mesh["pp"].get_group()
    dp_group = mesh["dp"].get_group() if topo.dp > 1 else None
    device = torch.device(topo.device)

    stage_blocks = [stage_block_ids(stage) for stage in all_stages]
    mine = stages_of(knobs["schedule"], topo.pp, topo.pp_rank, spr)
    modules, pipeline_stages = [], []
    for s in mine:  # only this rank's stages are ever allocated: the others stay on the meta device
        module = run.materialize(all_stages[s], device)
        modules.append(module)
        pipeline_stages.append(PipelineStage(module, s, n_stages, device, group=pp_group))

    schedule_cls = schedule_class(knobs["schedule"])
    multi = knobs["schedule"] in (*LOOPED, *V_SHAPED)
    target = pipeline_stages if multi else pipeline_stages[0]
    schedule = schedule_cls(target, n_microbatches=mb, loss_fn=loss_fn, scale_grads=True)
    step_kwargs = {"return_outputs": False} if "return_outputs" in inspect.signature(schedule.step).parameters else {}

    holder = nn.ModuleList(modules)
    per_replica = cfg["global_batch"] // topo.dp
    extra = {
        "schedule": knobs["schedule"],
        "microbatches": mb,
        "microbatch_size": per_replica // mb,
        "pp": topo.pp,
        "dp": topo.dp,
        "stages": n_stages,
        "stages_per_rank": spr,
        "stage_blocks": stage_blocks,
        "bubble_fraction": bubble_fraction(idle_ratio(knobs["schedule"], topo.pp, mb, spr)),
        "bubble_formula": f"r/(1+r), r = {BUBBLE_FORMULAS[knobs['schedule']]} (v = stages_per_rank, m = microbatches)",
        "dp_gradient_sync": "one flat all-reduce over the dp sub-mesh after the schedule" if topo.dp > 1 else None,
    }
    return PipelineParallel.build(
        holder, optimizer_for(holder.parameters(), run), topo, run, own_mixed_precision=True,
        holds_loss=any(s == n_stages - 1 for s in mine), extra=extra, stages=modules, schedule=schedule,
        has_first=0 in mine, has_last=n_stages - 1 in mine, step_kwargs=step_kwargs, dp_group=dp_group,
    )
