"""Model parallelism in one process (the PyTorch tutorials' "single-machine model parallel"): the model cut at
block boundaries into consecutive stages placed on `strategy.devices`, activations moved between them with
`.to()`. Optionally the tutorial's split-size trick: the batch goes through in chunks of `strategy.split_size`
as a wavefront, so chunk i runs on device k+1 while chunk i+1 runs on device k (on CUDA the kernels overlap
because they are queued asynchronously; on one CPU nothing overlaps). The distributed pipeline, one stage per
rank, is `strategy=pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.errors import positive_int, reject
from bench.models import count_blocks, loss_fn
from bench.parallel.topology import Topology
from bench.strategies import Memory, not_predicted, simulated
from bench.strategies.base import Parallel, autocast_dtype, checkpoint_and_compile, optimizer_for
from bench.strategies.stages import Stage, bubble_fraction, check_splittable, partition

PARITY = "model"
SINGLE_PROCESS = True
MODEL_NEEDS = {"pipeline_split"}


def stage_devices(cfg, n_blocks: int) -> list[str]:
    """`strategy.devices`, or by default every visible GPU (at most one per block) or, with fewer than two
    GPUs, two placements on the run's one device (same device: no parallelism, and the row says so)."""
    devices = cfg["strategy"]["devices"]
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


def check(cfg: dict) -> None:
    knobs = cfg["strategy"]
    if knobs["split_size"] is not None:
        positive_int(cfg, "strategy.split_size")
    devices = knobs["devices"]
    if devices is not None and (isinstance(devices, str) or not isinstance(devices, list) or not devices):
        reject("strategy.devices", "a list of devices such as [cuda:0,cuda:1] or [cpu,cpu], or null", devices)
    for d in devices or []:
        _check_device(cfg, d, devices)
    n = len(stage_devices(cfg, count_blocks(cfg["model"])))
    check_splittable(cfg, n, "strategy.devices", devices)


def _check_device(cfg: dict, entry, devices: list) -> None:
    try:
        dev = torch.device(entry)
    except (RuntimeError, TypeError):
        reject("strategy.devices", "entries like cuda:0, cuda:1 or cpu", entry)
    if dev.type not in ("cpu", "cuda"):
        reject("strategy.devices", "cpu or cuda:<index> entries", entry)
    if dev.type == "cuda":
        if cfg["device"] == "cpu":
            reject("strategy.devices", "cpu entries with device=cpu", devices)
        if not torch.cuda.is_available():
            reject("strategy.devices", "cpu entries: no CUDA device is visible on this machine", devices)
        if (dev.index or 0) >= torch.cuda.device_count():
            reject("strategy.devices", f"CUDA indices below {torch.cuda.device_count()}, the devices visible here",
                   devices)


def memory(run) -> Memory:
    devices = set(stage_devices(run.config, count_blocks(run.config["model"])))
    if len(devices) > 1:
        return not_predicted("the stages on several devices each hold their own share, which no one device's "
                             "simulation holds")
    return simulated()


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


def apply(model: nn.Module, topo: Topology, run) -> Parallel:
    cfg = run.config
    split_size = cfg["strategy"]["split_size"]
    n_blocks = len(run.model.blocks_of(model))
    devices = stage_devices(cfg, n_blocks)
    autocast = autocast_dtype(cfg["precision"])
    model = checkpoint_and_compile(model, run)
    parts = partition(n_blocks, len(devices))
    stages = [Stage(model, run.model, ids, first=s == 0, last=s == len(devices) - 1, autocast_dtype=autocast,
                    device_type=torch.device(devices[s]).type) for s, ids in enumerate(parts)]
    for stage, device in zip(stages, devices, strict=True):
        run.materialize(stage, device)  # each stage allocated on its own device, in place in the model
    pipe = InProcessPipeline(model, stages, devices, split_size)
    distinct = list(dict.fromkeys(str(d) for d in pipe.devices))
    batch = cfg["global_batch"] // cfg["grad_accum"]
    chunks = -(-batch // split_size) if split_size else 1
    extra = {
        "stage_devices": [str(d) for d in pipe.devices],
        "distinct_devices": len(distinct),
        "stages": len(stages),
        "stage_blocks": parts,
        "split_size": split_size,
        "chunks": chunks,
        "bubble_fraction": bubble_fraction((len(distinct) - 1) / chunks) if len(distinct) > 1 else None,
    }
    if len(distinct) < len(stages):
        extra["note"] = (f"{len(stages)} stages on {len(distinct)} device(s) ({', '.join(distinct)}): stages that "
                         "share a device run one after another, so this measures the split and the copies, not "
                         "parallelism")
    return InProcessParallel.build(pipe, optimizer_for(pipe.parameters(), run), topo, run, own_mixed_precision=True,
                                   devices=len(distinct), extra=extra)
