"""Where a rank's memory goes: bytes of the parameters, gradients and optimizer state it actually holds."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        local = _local(t)
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), local.numel()) if local.numel() else id(t)
        if key not in seen:  # tied or aliased tensors count once
            seen.add(key)
            total += local.numel() * local.element_size()
    return total


def held_mb(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Parameters, gradients (as left by the last backward) and optimizer state held by this rank, in MiB."""
    params = list(module.parameters())
    optimizer = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer's local shard
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "mem_params_mb": _bytes(params) / 2**20,
        "mem_grads_mb": _bytes(p.grad for p in params if p.grad is not None) / 2**20,
        "mem_optim_mb": _bytes(state) / 2**20,
    }
