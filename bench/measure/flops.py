"""Model FLOPs of one training step, counted by torch.utils.flop_counter, and MFU against a peak table."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from bench.models import loss_fn

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel: without these the
# attention matmuls of every CPU run would be missing from the count.
_CPU_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


def train_flops_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """FLOPs of forward + backward for one sample (matmuls, convolutions and attention; the optimizer
    and elementwise ops are not model FLOPs). Leaves no gradients behind."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]
