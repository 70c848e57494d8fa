"""Where a rank's memory goes: the bytes of the tensors it holds, by kind, at the peak of one training step.

torch's MemTracker (`torch.distributed._tools.mem_tracker`) follows every tensor's storage through a dispatch
mode and files it under parameters, buffers, gradients, optimizer states, activations, temporaries or other;
its "peak" snapshot is that breakdown at the moment the total was highest. Counting tensors, not the
process's RSS or the allocator's cache, shows what a strategy holds on CPU and GPU alike (FSDP's shards,
ZeRO's optimizer shard) without changing how the timed steps run: bench tracks one extra step after them.

Before a run whose step cannot be simulated (`bench.plan.memory`), what its tensors will hold at the least is
counted here without running the step and without allocating: the weights' kinds on the model's meta-device build
(`held_between_steps_mb`) and its blocks' outputs on fake tensors (`largest_block_output_bytes`), with no large
tensor made for real while the model is built (`no_large_tensors`).
"""

from __future__ import annotations

import contextlib
import logging

# MemTracker's kinds (the values of torch.distributed._tools.mem_tracker._MemRefType) -> bench's names
KINDS = {
    "Parameter": "params",
    "Buffer": "buffers",
    "Gradient": "grads",
    "Optstate": "optim",
    "Activation": "activations",
    "Temp": "temp",
    "Other": "other",
}


def peak_by_kind_mb(snapshot: dict) -> dict[str, float]:
    """MiB by kind, and their total, on the device whose peak is highest (the one a run fits on or not)."""
    if not snapshot:
        return {**dict.fromkeys(KINDS.values(), 0.0), "total": 0.0}
    per_device = max(snapshot.values(), key=lambda kinds: kinds.get("Total", 0))
    out = dict.fromkeys(KINDS.values(), 0.0)
    for kind, nbytes in per_device.items():
        name = getattr(kind, "value", kind)
        if name in KINDS:
            out[KINDS[name]] += nbytes / 2**20
    out["total"] = per_device.get("Total", 0) / 2**20
    return out


def held_between_steps_mb(module, optim_cfg: dict) -> dict[str, float]:
    """MiB by kind of what `module`'s tensors hold whole between steps, counted on its meta-device build: its
    parameters (a tied weight once) and buffers, a gradient per trainable parameter and the run's optimizer state
    (`optimizer_state_ratio`); the other kinds 0."""
    params = list(module.parameters())
    trainable = sum(p.nbytes for p in params if p.requires_grad) / 2**20
    return {**dict.fromkeys(KINDS.values(), 0.0), "params": sum(p.nbytes for p in params) / 2**20,
            "buffers": sum(b.nbytes for b in module.buffers()) / 2**20, "grads": trainable,
            "optim": trainable * optimizer_state_ratio(optim_cfg)}


def optimizer_state_ratio(optim_cfg: dict) -> float:
    """Bytes of optimizer state per byte of weight: the run's optimizer stepped once on a fake weight of 1024
    values (1 for SGD with momentum, 2 for AdamW's moments, 0 for plain SGD; a step count, a scalar, left out).
    Once per optimizer config in a process (a plan asks it of every layout: 6 ms each)."""
    import json

    key = json.dumps(optim_cfg, sort_keys=True, default=str)
    if key not in _STATE_RATIOS:
        _STATE_RATIOS[key] = _state_ratio(optim_cfg)
    return _STATE_RATIOS[key]


_STATE_RATIOS: dict[str, float] = {}


def _state_ratio(optim_cfg: dict) -> float:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.parallel.optim import build_optimizer

    with FakeTensorMode():
        weight = torch.nn.Parameter(torch.zeros(1024))
        weight.grad = torch.zeros(1024)
        optimizer = build_optimizer([weight], optim_cfg)
        optimizer.step()
        held = [t for t in optimizer.state[weight].values() if isinstance(t, torch.Tensor) and t.numel() == 1024]
    return sum(t.nbytes for t in held) / weight.nbytes


@contextlib.contextmanager
def no_large_tensors(limit_bytes: int = 2**26):
    """Every tensor factory (`torch.empty`, `zeros`, `randn`, ...) whose result would exceed `limit_bytes` makes
    it on the meta device: a model is built with its parameters moved to meta only once registered
    (`bench.models.init.parameters_on_meta`), so model.seq_len=2**31 first asked for GPT's 1 TiB position
    embedding for real, in the controller. Smaller tensors stay real: buffers a constructor computes from keep
    their values (rotary frequencies); a buffer that large goes to meta, where no fake tensor reads its values."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors

    factories = _device_constructors()

    class LargeOnMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in factories:
                with contextlib.suppress(Exception):  # a factory meta cannot make is made as asked
                    shaped = func(*args, **{**kwargs, "device": "meta"})
                    if isinstance(shaped, torch.Tensor) and shaped.nbytes > limit_bytes:
                        return shaped
            return func(*args, **kwargs)

    with LargeOnMeta():
        yield


@contextlib.contextmanager
def quiet_fake_tensors():
    """FakeTensorMode logs a failing operator's whole stack before raising: `why` says it in one line."""
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        fake_log.setLevel(level)


def optimizer_state(parameters, optimizer) -> None:
    """The optimizer's state as a first step leaves it, without running one (half a simulation's work): a step on
    gradients of zeros. The tracked step then begins as a run's second step does, its gradients set to None."""
    import torch

    for p in parameters:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # a GradScaler's step needs a scaled loss first; its own state is one number
