"""Pipeline parallelism: the model cut at block boundaries into stages, one stage per pipeline rank
(`parallel.pp`; interleaved schedules: `strategy.stages_per_rank` each), run by `torch.distributed.pipelining`'s
schedule (`strategy.schedule`) over `strategy.microbatches` micro-batches of each replica's batch:
- gpipe, 1f1b: one stage per rank;
- interleaved (1F1B), interleaved_zb (zero bubble, ZB-H1's order interleaved): stages looped, s on rank s % pp;
- zbv (ZB-V), dualpipev (DeepSeek-V3's DualPipe on a V): two stages per rank in a V, rank r holding stages r
  and 2pp-1-r.
The zero-bubble schedules split each backward into its input gradient (sent upstream at once) and its weight
gradient (run later, in what would be the bubble).
With `parallel.dp > 1` every stage's gradients are averaged over its "dp" sub-mesh (the ranks holding the same
stage in the other replicas): all-reduced after the schedule (Megatron's data parallelism), or with
`strategy.fsdp=true` each stage FSDP2-sharded over them (HSDP with `parallel.dp_replicate > 1`). With
`parallel.tp > 1` each stage's layers are tensor-parallel too: 3-D, dp x tp x pp, composed in torchtitan's
order (`bench.strategies.stage_sharding`). The in-process split over one process's devices is
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
from bench.parallel.topology import REPLICATE, Degrees, Topology, parallel_degrees
from bench.strategies import Memory, collective, stage_by_stage
from bench.strategies.base import Parallel, autocast_dtype, checkpoint_and_compile, optimizer_for
from bench.strategies.schedules import (
    BUBBLE_FORMULAS,
    LOOPED,
    SCHEDULES,
    V_SHAPED,
    ZERO_BUBBLE,
    idle_ratio,
    microbatch_count,
    schedule_class,
    stages_of,
)
from bench.strategies.stage_sharding import gathered_parameters, local_tensor, shard_stage, tensor_parallel
from bench.strategies.stage_sharding import sharded as stage_sharded
from bench.strategies.stages import bubble_fraction, build_stages, check_splittable, stage_block_ids
from bench.strategies.tensor import check_tp_sizes

PARITY = "model"
DEGREES = {"dp", REPLICATE, "tp", "pp"}


def MODEL_NEEDS(cfg: dict) -> set[str]:
    degrees = parallel_degrees(cfg)
    if degrees["tp"] == 1:
        return {"pipeline_split"}
    return {"pipeline_split", "tp_plan"} | ({"sharded_tp_plan"} if stage_sharded(cfg, degrees["dp"]) else set())



def check(cfg: dict) -> None:
    knobs = cfg["strategy"]
    if knobs["schedule"] not in SCHEDULES:
        reject("strategy.schedule", f"one of {', '.join(SCHEDULES)}", knobs["schedule"])
    positive_int(cfg, "strategy.microbatches")
    if knobs["microbatch_size"] is not None:
        positive_int(cfg, "strategy.microbatch_size")
    positive_int(cfg, "strategy.stages_per_rank")
    if cfg["grad_accum"] != 1:
        reject("grad_accum", "1 with strategy=pipeline (the schedule's micro-batches already split the batch: set "
               "strategy.microbatches instead)", cfg["grad_accum"])
    if cfg["precision"] == "fp16":
        reject("precision", "fp32 or bf16 with strategy=pipeline (the schedule runs backward itself, so fp16 loss "
               "scaling and a found-inf check agreed across stages are not wired in)", "fp16",
               "; or use strategy=modelparallel, which supports fp16")
    degrees = parallel_degrees(cfg)
    dp, pp, spr, mb = degrees["dp"], degrees["pp"], knobs["stages_per_rank"], microbatch_count(cfg, degrees["dp"])
    if knobs["microbatch_size"] and cfg["global_batch"] % (dp * knobs["microbatch_size"]):
        reject("strategy.microbatch_size", f"a divisor of the per-replica batch (global_batch={cfg['global_batch']} / "
               f"parallel.dp={dp})", knobs["microbatch_size"], "; or change global_batch")
    if not isinstance(knobs["fsdp"], bool):
        reject("strategy.fsdp", "true or false", knobs["fsdp"])
    if degrees[REPLICATE] > 1 and not knobs["fsdp"]:
        reject("strategy.fsdp", f"true with parallel.{REPLICATE}={degrees[REPLICATE]} (HSDP: each stage sharded "
               "within its replica, replicated across them)", False, f"; or set parallel.{REPLICATE}=1")
    if degrees["tp"] > 1:
        check_tp_sizes(cfg, degrees["tp"])
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
    """Every pipeline of pp stages, each stage tensor-parallel over tp ranks within a node, replicated
    dp = world / (tp x pp) times: pp >= 2, or with tp > 1 and replicas a single stage too (Megatron's tensor x
    data parallelism without a pipeline); over several nodes, where each node holds whole replicas' stages, the replicas
    as HSDP too (sharded within a node, replicated across nodes)."""
    out = []
    for tp in (tp for tp in range(1, world + 1) if world % tp == 0 and tp <= (ranks_per_node or world)):
        for pp in (pp for pp in range(world // tp, 0 if 1 < tp < world else 1, -1) if world // tp % pp == 0):
            dp, nodes = world // (tp * pp), world // ranks_per_node if ranks_per_node else 1
            out.append(Degrees(dp=dp, tp=tp, pp=pp))
            if nodes > 1 and world % ranks_per_node == 0 and dp % nodes == 0 and dp > nodes:
                out.append(Degrees(dp=dp, tp=tp, pp=pp, dp_replicate=nodes))
    return out


def variants(degrees: Degrees) -> list[dict]:
    """With replicas: their gradients all-reduced (Megatron's data parallelism) or each stage FSDP-sharded over
    them (torchtitan's); HSDP is sharded."""
    if degrees.dp == 1:
        return [{}]
    return [{"fsdp": True}] if degrees.dp_replicate > 1 else [{"fsdp": False}, {"fsdp": True}]


def memory(run) -> Memory:
    """Each pipeline rank's stages, run in the schedule's order on fake tensors (`bench.plan.pipeline`): torch's
    schedule itself cannot run on them (its shape exchange reads values)."""
    degrees = run.degrees
    shards = degrees.tp * (degrees.dp if stage_sharded(run.config, degrees.dp) else 1)
    # FSDP under the schedule gathers a stage once a step and keeps it, its gradients unsharded until the step's
    # last backward (reshard_after_forward=False, as torchtitan runs it; torch's stage syncs gradients once)
    return stage_by_stage(degrees.pp * run.config["strategy"]["stages_per_rank"], shards, degrees.tp)


def collectives(run, sizes) -> list[dict]:
    """Each of the rank's stages (stages_per_rank of them, looped) sends an activation forward and a gradient back
    per micro-batch; with replicas, a stage's gradients in one flat all-reduce after the schedule."""
    knobs, degrees = run.config["strategy"], run.degrees
    out = []
    if degrees.pp > 1 and sizes.boundary_bytes_per_sample:
        micro, stages = microbatch_count(run.config, degrees.dp), knobs["stages_per_rank"]
        per_micro = sizes.boundary_bytes_per_sample * run.config["global_batch"] // degrees.dp // micro
        sends = 2 * micro * stages
        out.append(collective("p2p", 2, sends, sends * per_micro))
    if degrees.dp > 1 and not stage_sharded(run.config, degrees.dp):  # FSDP's collectives are traced by the simulation
        # a stage's replicas are pp x tp ranks apart (dp-major layout, bench.parallel.topology)
        out.append(collective("all_reduce", degrees.dp, 1, 4.0 * sizes.params / degrees.pp / degrees.tp,
                              span=(degrees.dp - 1) * degrees.pp * degrees.tp + 1))
    return out


def bubble(run) -> float:
    """The schedule's idle time as a multiple of its compute (`BUBBLE_FORMULAS`, from each schedule's paper)."""
    pp = run.degrees.pp
    knobs = run.config["strategy"]
    return idle_ratio(knobs["schedule"], pp, microbatch_count(run.config, run.degrees.dp), knobs["stages_per_rank"])


def batch_unit(run) -> int:
    return run.config["strategy"]["microbatch_size"] or run.config["strategy"]["microbatches"]


@dataclass
class PipelineParallel(Parallel):
    """This rank's stages and the schedule that runs them; `forward_backward` is one schedule step."""

    stages: list[nn.Module] = field(default_factory=list)  # this rank's stage modules
    schedule: object = None
    dp_group: object = None  # with dp > 1, unsharded: the ranks holding the same stages in the other replicas
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
        # tensor-parallel gradients are DTensors: their local shards are what the replicas share
        grads = [local_tensor(p.grad) for stage in self.stages for p in stage.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.dp_group)
        flat.div_(self.topo.dp)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def full_parameters(self) -> dict[str, torch.Tensor] | None:
        """Every stage's parameters of the first replica, gathered to rank 0 (collective on all ranks)."""
        local = gathered_parameters(self.stages, keep=self.topo.dp_rank == 0 and self.topo.tp_rank == 0)
        gathered = [None] * self.topo.world_size if self.topo.rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if self.topo.rank != 0:
            return None
        return {name: t for part in gathered for name, t in part.items()}


def apply(model: nn.Module, topo: Topology, run) -> Parallel:
    from torch.distributed.pipelining import PipelineStage

    cfg = run.config
    knobs = cfg["strategy"]
    spr, mb = knobs["stages_per_rank"], microbatch_count(cfg, topo.dp)
    n_stages = topo.pp * spr
    mesh = topo.mesh()
    sharded = stage_sharded(cfg, topo.dp)
    model = checkpoint_and_compile(tensor_parallel(model, mesh, run), run)  # the full model's blocks, in place
    all_stages = build_stages(model, run.model, n_stages, device_type=topo.device_type,
                              autocast_dtype=None if sharded else autocast_dtype(cfg["precision"]))
    pp_group = mesh["pp"].get_group()
    dp_group = topo.submesh("dp").get_group() if topo.dp > 1 and not sharded else None
    device = torch.device(topo.device)

    stage_blocks = [stage_block_ids(stage) for stage in all_stages]
    mine = stages_of(knobs["schedule"], topo.pp, topo.pp_rank, spr)
    modules, pipeline_stages = [], []
    for s in mine:  # only this rank's stages are ever allocated: the others stay on the meta device
        if sharded:
            shard_stage(all_stages[s], mesh, run)
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
        "tp": topo.tp,
        "stages": n_stages,
        "stages_per_rank": spr,
        "stage_blocks": stage_blocks,
        "bubble_fraction": bubble_fraction(idle_ratio(knobs["schedule"], topo.pp, mb, spr)),
        "bubble_formula": f"r/(1+r), r = {BUBBLE_FORMULAS[knobs['schedule']]} (v = stages_per_rank, m = microbatches)",
        "dp_gradient_sync": dp_gradient_sync(topo, sharded),
    }
    return PipelineParallel.build(
        holder, optimizer_for(holder.parameters(), run), topo, run, own_mixed_precision=True,
        holds_loss=any(s == n_stages - 1 for s in mine), extra=extra, stages=modules, schedule=schedule,
        has_first=0 in mine, has_last=n_stages - 1 in mine, step_kwargs=step_kwargs, dp_group=dp_group,
    )


def dp_gradient_sync(topo: Topology, sharded: bool) -> str | None:
    if topo.dp == 1:
        return None
    if not sharded:
        return "one flat all-reduce over the dp sub-mesh after the schedule"
    hsdp = f" within each of {topo.dp_replicate} replicas, all-reduced across them" if topo.dp_replicate > 1 else ""
    return f"FSDP2: gathered once per step, reduce-scattered after the last micro-batch{hsdp}"
