"""`Parallel`, what a strategy hands the train loop, and the pieces several strategies share."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.models import loss_fn
from bench.models.init import is_dtensor
from bench.parallel.optim import build_optimizer
from bench.parallel.topology import Topology

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> autocast dtype (fp32: none)


def autocast_dtype(precision: str) -> torch.dtype | None:
    return AUTOCAST_DTYPES.get(precision)


@dataclass
class Parallel:
    module: nn.Module  # the model as the strategy wrapped it (for a pipeline: this rank's stages)
    optimizer: torch.optim.Optimizer
    topo: Topology
    holds_loss: bool = True  # whether this rank's forward_backward returns the loss of its data shard
    grad_accum: int = 1  # micro-batches per step on this rank
    autocast_dtype: torch.dtype | None = None  # None: no autocast (fp32, or a strategy's own mixed precision)
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    devices: int = 1  # devices this process drives (nn.DataParallel drives several)
    extra: dict = field(default_factory=dict)  # strategy-specific facts for the row

    @classmethod
    def build(cls, module: nn.Module, optimizer: torch.optim.Optimizer, topo: Topology, run,
              own_mixed_precision: bool = False, **kwargs) -> Parallel:
        """A Parallel with the run's precision and gradient accumulation."""
        precision = run.config["precision"]
        autocast = None if own_mixed_precision else autocast_dtype(precision)
        scaler = torch.amp.GradScaler(topo.device_type) if precision == "fp16" else None
        return cls(module, optimizer, topo, grad_accum=run.config["grad_accum"], autocast_dtype=autocast,
                   scaler=scaler, **kwargs)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's batch; returns its loss (on the device: no sync).
        `zero_grad` comes first, so the last step's gradients remain to be accounted for."""
        self.zero_grad()
        loss = self.forward_backward(x, y)
        self.optimizer_step()
        return loss

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward over this rank's batch in `grad_accum` micro-batches; returns the batch loss."""
        total = torch.zeros((), device=x.device)
        chunks = list(zip(x.chunk(self.grad_accum), y.chunk(self.grad_accum), strict=True))
        for i, (xc, yc) in enumerate(chunks):
            with self.gradient_sync(last=i == len(chunks) - 1), self.autocast():
                loss = loss_fn(self.module(xc), yc) / len(chunks)
            self.backward(loss)
            total += loss.detach()
        return total

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.topo.device_type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def gradient_sync(self, last: bool):
        """Skip the gradient reduction on all but the last micro-batch (DDP's no_sync, FSDP2's switch)."""
        if last:
            yield
        elif hasattr(self.module, "no_sync"):
            with self.module.no_sync():
                yield
        elif hasattr(self.module, "set_requires_gradient_sync"):
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def full_parameters(self) -> dict[str, torch.Tensor] | None:
        """Every parameter of the whole model, unsharded, on the CPU, named as in the unwrapped model: on
        rank 0 (None elsewhere). Collective where parameters are DTensors (FSDP2, tensor parallel): every
        rank must call it, and does so in the same parameter order."""
        full = {}
        for name, p in unwrap(self.module).named_parameters():
            if is_dtensor(p):
                p = p.full_tensor()
            if self.topo.rank == 0:
                full[name] = p.detach().cpu().clone()
        return full if self.topo.rank == 0 else None


def checkpoint_and_compile(model: nn.Module, run) -> nn.Module:
    """Activation checkpointing, then torch.compile, block by block and in place (torchtitan's order, before
    any sharding). In place keeps parameter names, so every strategy's parameters match the single run's."""
    cfg = run.config
    for block in run.model.blocks_of(model):
        if cfg["activation_checkpointing"]:
            from torch.distributed._composable import checkpoint

            checkpoint(block)
        if cfg["compile"]:
            block.compile(backend=cfg["compile_backend"])
    return model


def optimizer_for(params, run) -> torch.optim.Optimizer:
    """The run's optimizer (`optim.*`) over `params`."""
    return build_optimizer(params, run.config["optim"])


def unwrap(module: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module
