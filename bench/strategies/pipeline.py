"""Pipeline parallelism (network partitioning): the model split at block boundaries into stages.

`pipeline.mode=distributed` (default): `torch.distributed.pipelining` stages over the pipeline ranks
(`parallel.pp`), run by a GPipe, 1F1B or interleaved 1F1B schedule over `pipeline.microbatches`
micro-batches of each replica's batch. With `parallel.dp > 1` it is 2-D: every stage's module is
averaged over its "dp" sub-mesh (the ranks holding the same stage in the other replicas).

`pipeline.mode=inprocess`: the classic model parallelism of the PyTorch tutorials: one process,
consecutive layer groups placed on a list of devices, activations moved between them with `.to()`, and
optionally the tutorial's split-size trick (chunk i runs on device k+1 while chunk i+1 runs on device k;
on CUDA the kernels overlap because they are queued asynchronously; on one CPU nothing overlaps).

Each stage is a small module that holds the full model's own submodules under the full model's attribute
names (blocks in an nn.ModuleDict keyed by their index), so a stage's parameters are named exactly as in
the single run (`blocks.3.fc.weight`) and parity can compare them one by one.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from bench.config import parallel_degrees, reject, world_size
from bench.models import build_model, model_module
from bench.optim import build_optimizer
from bench.strategies import DTYPES, Parallel, checkpoint_and_compile, loss_fn, unwrap
from bench.topology import Topology

PARITY = "model"
DEGREES = {"dp", "pp"}
MODES = ("distributed", "inprocess")
SCHEDULES = ("gpipe", "1f1b", "interleaved")


class Split(NamedTuple):
    """How a model's forward runs around `model.blocks`: the submodules before and after them, and the
    code that uses them (called with the stage module, which holds those submodules under the same names)."""

    pre: tuple[str, ...]
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    post: tuple[str, ...]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _gpt_embed(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return m.tok_emb(idx) + m.pos_emb(torch.arange(idx.shape[1], device=idx.device))


SPLITS = {
    "mlp": Split(("inp",), lambda m, x: torch.relu(m.inp(x)), ("head",), lambda m, x: m.head(x)),
    "gpt": Split(("tok_emb", "pos_emb"), _gpt_embed, ("norm", "head"), lambda m, x: m.head(m.norm(x))),
}


def model_split(model_cfg: dict) -> Split | None:
    """The model's split: its own module's `PIPELINE_SPLIT` (a `Split`) if it defines one, else the table."""
    return getattr(model_module(model_cfg), "PIPELINE_SPLIT", None) or SPLITS.get(model_cfg["name"])


def knobs(cfg: dict) -> dict:
    return cfg["pipeline"]


def partition(n_blocks: int, n_stages: int) -> list[list[int]]:
    """Consecutive block indices per stage, as even as possible (earlier stages take the remainder)."""
    size, rest = divmod(n_blocks, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        end = start + size + (s < rest)
        out.append(list(range(start, end)))
        start = end
    return out


def bubble_fraction(pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle share of a step in the schedule's ideal timeline: (pp-1) / (v*m + pp-1), v stages per rank
    (v=1: GPipe and 1F1B; v>1: interleaved 1F1B, Megatron-LM's estimate)."""
    return (pp - 1) / (stages_per_rank * microbatches + pp - 1)


# --------------------------------------------------------------------------------------------- checks


def count_blocks(model_cfg: dict) -> int:
    """The model's number of blocks, from a build on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return len(build_model(model_cfg).blocks)


def _blocks_key(model_cfg: dict, n_blocks: int) -> str:
    for key in ("layers", "n_layers", "depth", "blocks"):
        if model_cfg.get(key) == n_blocks:
            return f"model.{key}"
    return "the model's size"


def _positive(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        reject(key, "a positive integer", value)


def check(cfg: dict) -> None:
    p = knobs(cfg)
    if p["mode"] not in MODES:
        reject("pipeline.mode", f"one of {', '.join(MODES)}", p["mode"])
    split = model_split(cfg["model"])
    if split is None:
        reject("model", f"a model strategy=pipeline knows how to split ({', '.join(SPLITS)}; or define "
               "PIPELINE_SPLIT in the model's module)", cfg["model"]["name"])
    n_blocks = count_blocks(cfg["model"])
    if p["mode"] == "inprocess":
        _check_inprocess(cfg, n_blocks)
    else:
        _check_distributed(cfg, n_blocks)


def _check_distributed(cfg: dict, n_blocks: int) -> None:
    p = knobs(cfg)
    if p["schedule"] not in SCHEDULES:
        reject("pipeline.schedule", f"one of {', '.join(SCHEDULES)}", p["schedule"])
    _positive("pipeline.microbatches", p["microbatches"])
    _positive("pipeline.stages_per_rank", p["stages_per_rank"])
    if cfg["grad_accum"] != 1:
        reject("grad_accum", "1 with strategy=pipeline pipeline.mode=distributed (the schedule's micro-batches "
               "already split the batch: set pipeline.microbatches instead)", cfg["grad_accum"])
    if cfg["precision"] == "fp16":
        reject("precision", "fp32 or bf16 with strategy=pipeline pipeline.mode=distributed (the schedule runs "
               "backward itself, so fp16 loss scaling and a found-inf check agreed across stages are not wired "
               "in)", "fp16", "; or use pipeline.mode=inprocess, which supports fp16")
    degrees = parallel_degrees(cfg)
    dp, pp, spr, mb = degrees["dp"], degrees["pp"], p["stages_per_rank"], p["microbatches"]
    if p["schedule"] == "interleaved" and spr < 2:
        reject("pipeline.stages_per_rank", "at least 2 with pipeline.schedule=interleaved (interleaved 1F1B "
               "loops over several stages per rank)", spr)
    if p["schedule"] != "interleaved" and spr != 1:
        reject("pipeline.stages_per_rank", f"1 with pipeline.schedule={p['schedule']} (one stage per rank)", spr,
               "; or set pipeline.schedule=interleaved")
    stages = pp * spr
    if stages > n_blocks:
        key = "pipeline.stages_per_rank" if spr > 1 else "parallel.pp"
        reject(key, f"at most {n_blocks} pipeline stages in all, one per block of the model at least "
               f"(parallel.pp={pp} x pipeline.stages_per_rank={spr} = {stages} stages)",
               spr if spr > 1 else pp, f"; or give the model more blocks ({_blocks_key(cfg['model'], n_blocks)}) "
               "or run fewer ranks (launch.nproc)")
    batch = cfg["global_batch"]
    if batch % (dp * mb):
        reject("pipeline.microbatches", f"a divisor of the per-replica batch (global_batch={batch} / parallel.dp="
               f"{dp}) so that global_batch is divisible by dp x microbatches", mb,
               "; or change global_batch")
    if p["schedule"] == "1f1b" and mb < pp:
        reject("pipeline.microbatches", f"at least the number of stages ({pp}) with pipeline.schedule=1f1b", mb)
    if p["schedule"] == "interleaved":
        rounds = max(1, mb // pp)
        if mb % rounds:
            reject("pipeline.microbatches", f"a multiple of the rounds max(1, microbatches // pp) = {rounds} with "
                   f"pipeline.schedule=interleaved (e.g. a multiple of parallel.pp={pp})", mb)


def inprocess_devices(cfg: dict, n_blocks: int) -> list[str]:
    """`pipeline.devices`, or by default every visible GPU (at most one per block) or, with fewer than two
    GPUs, two placements on the run's one device (same device: no parallelism, and the row says so)."""
    devices = knobs(cfg)["devices"]
    if devices:
        return [str(d) for d in devices]
    device = cfg["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        n = torch.cuda.device_count()
        if n >= 2:
            return [f"cuda:{i}" for i in range(min(n, n_blocks))]
        return ["cuda:0", "cuda:0"]
    return ["cpu", "cpu"]


def _check_inprocess(cfg: dict, n_blocks: int) -> None:
    p = knobs(cfg)
    if world_size(cfg) != 1:
        reject("launch.nproc", "1 with strategy=pipeline pipeline.mode=inprocess (one process drives every "
               "device)", cfg["launch"]["nproc"], "; or use pipeline.mode=distributed")
    if p["split_size"] is not None:
        _positive("pipeline.split_size", p["split_size"])
    devices = p["devices"]
    if devices is not None and (isinstance(devices, str) or not isinstance(devices, list) or not devices):
        reject("pipeline.devices", "a list of devices such as [cuda:0,cuda:1] or [cpu,cpu], or null", devices)
    for d in devices or []:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError):
            reject("pipeline.devices", "entries like cuda:0, cuda:1 or cpu", d)
        if dev.type not in ("cpu", "cuda"):
            reject("pipeline.devices", "cpu or cuda:<index> entries", d)
        if dev.type == "cuda":
            if cfg["device"] == "cpu":
                reject("pipeline.devices", "cpu entries with device=cpu", devices)
            if not torch.cuda.is_available():
                reject("pipeline.devices", "cpu entries: no CUDA device is visible on this machine", devices)
            if (dev.index or 0) >= torch.cuda.device_count():
                reject("pipeline.devices", f"CUDA indices below {torch.cuda.device_count()}, the devices visible "
                       "here", devices)
    n = len(inprocess_devices(cfg, n_blocks))
    if n > n_blocks:
        reject("pipeline.devices", f"at most {n_blocks} devices, one block of the model each at least", devices,
               f"; or give the model more blocks ({_blocks_key(cfg['model'], n_blocks)})")


# ------------------------------------------------------------------------------------------ the stage


class Stage(nn.Module):
    """The blocks `block_ids` of `model` (plus the layers before the blocks on the first stage and those
    after them on the last), held under the full model's names so parameter names match the single run."""

    def __init__(self, model: nn.Module, split: Split, block_ids: list[int], first: bool, last: bool,
                 autocast_dtype: torch.dtype | None = None, device_type: str = "cpu"):
        super().__init__()
        self.split, self.first, self.last = split, first, last
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        if first:
            for name in split.pre:
                setattr(self, name, getattr(model, name))
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in block_ids})
        if last:
            for name in split.post:
                setattr(self, name, getattr(model, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(self.device_type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            if self.first:
                x = self.split.embed(self, x)
            for block in self.blocks.values():
                x = block(x)
            if self.last:
                x = self.split.head(self, x)
        return x


def build_stages(model: nn.Module, split: Split, n_stages: int, **kwargs) -> list[Stage]:
    parts = partition(len(model.blocks), n_stages)
    return [Stage(model, split, ids, first=s == 0, last=s == n_stages - 1, **kwargs) for s, ids in enumerate(parts)]


# -------------------------------------------------------------------------------- distributed stages


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


def release_unowned(model: nn.Module, kept: list[nn.Module]) -> None:
    """Free the layers other ranks run (moved to the meta device, in place): the worker keeps a reference to
    the whole model, and they would otherwise stay in this rank's memory for the whole run."""
    owned = {id(p) for stage in kept for p in stage.parameters()}
    for name, child in model.named_children():
        for module in child if name == "blocks" else [child]:
            if not any(id(p) in owned for p in module.parameters()):
                module.to("meta")


def _schedule_class(name: str):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}[name]


def apply_distributed(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    from torch.distributed.pipelining import PipelineStage

    p = knobs(cfg)
    spr, mb = p["stages_per_rank"], p["microbatches"]
    n_stages = topo.pp * spr
    autocast = DTYPES[cfg["precision"]] if cfg["precision"] != "fp32" else None
    model = checkpoint_and_compile(model, cfg)  # in place on the full model's blocks, before the split
    all_stages = build_stages(model, model_split(cfg["model"]), n_stages, autocast_dtype=autocast,
                              device_type=topo.device_type)
    mesh = topo.mesh()
    pp_group = mesh["pp"].get_group()
    dp_group = mesh["dp"].get_group() if topo.dp > 1 else None
    device = torch.device(topo.device)

    stage_blocks = [sorted(int(i) for i in stage.blocks) for stage in all_stages]
    mine = [s for s in range(n_stages) if s % topo.pp == topo.pp_rank]  # looped: stage s on pp rank s % pp
    release_unowned(model, [all_stages[s] for s in mine])
    modules, pipeline_stages = [], []
    for s in mine:
        module = all_stages[s].to(device)
        modules.append(module)
        pipeline_stages.append(PipelineStage(module, s, n_stages, device, group=pp_group))

    schedule_cls = _schedule_class(p["schedule"])
    target = pipeline_stages if p["schedule"] == "interleaved" else pipeline_stages[0]
    schedule = schedule_cls(target, n_microbatches=mb, loss_fn=loss_fn, scale_grads=True)
    step_kwargs = {"return_outputs": False} if "return_outputs" in inspect.signature(schedule.step).parameters else {}

    holder = nn.ModuleList(modules)
    optimizer = build_optimizer(holder.parameters(), cfg["optim"])
    per_replica = cfg["global_batch"] // topo.dp
    extra = {
        "mode": "distributed",
        "schedule": p["schedule"],
        "microbatches": mb,
        "microbatch_size": per_replica // mb,
        "pp": topo.pp,
        "dp": topo.dp,
        "stages": n_stages,
        "stages_per_rank": spr,
        "stage_blocks": stage_blocks,
        "bubble_fraction": bubble_fraction(topo.pp, mb, spr),
        "bubble_formula": "(pp-1)/(stages_per_rank*microbatches+pp-1)",
        "dp_gradient_sync": "one flat all-reduce over the dp sub-mesh after the schedule" if topo.dp > 1 else None,
    }
    return PipelineParallel.build(
        holder, optimizer, topo, cfg, own_mixed_precision=True, holds_loss=any(s == n_stages - 1 for s in mine),
        extra=extra, stages=modules, schedule=schedule, has_first=0 in mine, has_last=n_stages - 1 in mine,
        step_kwargs=step_kwargs, dp_group=dp_group,
    )


# ---------------------------------------------------------------------------------- in-process stages


class InProcessPipeline(nn.Module):
    """Consecutive stages on a list of devices in one process; `module` is the whole model (names as in the
    single run), the stages hold its submodules. With `split_size`, the batch goes through in chunks as a
    wavefront: at each tick stage k runs chunk t-k, the later stages queued first (the tutorial's order)."""

    def __init__(self, model: nn.Module, stages: list[Stage], devices: list[str], split_size: int | None):
        super().__init__()
        self.module = model
        self.stages = list(stages)  # a plain list: the parameters are registered once, under `module`
        self.devices = [torch.device(d) for d in devices]
        self.split_size = split_size
        for stage, device in zip(self.stages, self.devices, strict=True):
            stage.to(device)  # in place: moves the model's own submodules

    @property
    def output_device(self) -> torch.device:
        return self.devices[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split_size:
            for stage, device in zip(self.stages, self.devices, strict=True):
                x = stage(x.to(device))
            return x
        acts = list(x.split(self.split_size))
        n, k_stages = len(acts), len(self.stages)
        for tick in range(n + k_stages - 1):
            for k in reversed(range(k_stages)):
                i = tick - k
                if 0 <= i < n:
                    acts[i] = self.stages[k](acts[i].to(self.devices[k]))
        return torch.cat(acts)


@dataclass
class InProcessParallel(Parallel):
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """As Parallel's, with the targets and the loss on the last stage's device."""
        y = y.to(self.module.output_device)
        total = torch.zeros((), device=y.device)
        chunks = list(zip(x.chunk(self.grad_accum), y.chunk(self.grad_accum), strict=True))
        for xc, yc in chunks:
            loss = loss_fn(self.module(xc), yc) / len(chunks)
            self.backward(loss)
            total += loss.detach()
        return total

    def optimizer_step(self) -> None:
        """Then wait for the other GPUs too: the train loop synchronises only this rank's own device at the
        timing edge, and the later stages' work is queued on theirs."""
        super().optimizer_step()
        for device in dict.fromkeys(self.module.devices):
            if device.type == "cuda" and device != torch.device(self.topo.device):
                torch.cuda.synchronize(device)


def apply_inprocess(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    p = knobs(cfg)
    devices = inprocess_devices(cfg, len(model.blocks))
    autocast = DTYPES[cfg["precision"]] if cfg["precision"] != "fp32" else None
    model = checkpoint_and_compile(model, cfg)
    split = model_split(cfg["model"])
    parts = partition(len(model.blocks), len(devices))
    stages = [Stage(model, split, ids, first=s == 0, last=s == len(devices) - 1, autocast_dtype=autocast,
                    device_type=torch.device(devices[s]).type) for s, ids in enumerate(parts)]
    pipe = InProcessPipeline(model, stages, devices, p["split_size"])
    distinct = list(dict.fromkeys(str(d) for d in pipe.devices))
    batch = cfg["global_batch"] // cfg["grad_accum"]
    chunks = -(-batch // p["split_size"]) if p["split_size"] else 1
    extra = {
        "mode": "inprocess",
        "stage_devices": [str(d) for d in pipe.devices],
        "distinct_devices": len(distinct),
        "stages": len(stages),
        "stage_blocks": parts,
        "split_size": p["split_size"],
        "chunks": chunks,
        "bubble_fraction": bubble_fraction(len(distinct), chunks) if len(distinct) > 1 else None,
    }
    if len(distinct) < len(stages):
        extra["note"] = (f"{len(stages)} stages on {len(distinct)} device(s) ({', '.join(distinct)}): stages that "
                         "share a device run one after another, so this measures the split and the copies, not "
                         "parallelism")
    optimizer = build_optimizer(pipe.parameters(), cfg["optim"])
    return InProcessParallel.build(pipe, optimizer, topo, cfg, own_mixed_precision=True, devices=len(distinct),
                                   extra=extra)


def apply(model: nn.Module, topo: Topology, cfg: dict) -> Parallel:
    if knobs(cfg)["mode"] == "inprocess":
        return apply_inprocess(model, topo, cfg)
    return apply_distributed(model, topo, cfg)
