"""FLOPs of one training step by two stated conventions, counted without allocating the model.

- Hardware FLOPs: what the device executes, as torch's FlopCounterMode counts one forward and backward of the
  model (matmuls, convolutions, attention kernels) built under FakeTensorMode on the CPU: no memory, no
  compute. Activation-checkpointing recompute is included; attention is counted over the whole T x T square
  as the fused kernels compute it, plus flash attention's recompute of QK^T in its backward. The optimizer
  and elementwise ops are not counted.
- Model FLOPs: what the model needs, recompute not counted: the model's own analytic count where its module
  defines `model_flops_per_sample` (the GPT: 6NT + 6LT^2d, see its FLOPS_CONVENTION), else the hardware count
  of the step without activation checkpointing (`COUNTER_CONVENTION`).

MFU divides the model FLOPs by the step time and the peak; HFU does the same with the hardware FLOPs.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from bench.models import build_model, loss_fn, model_blocks, model_spec

aten = torch.ops.aten

COUNTER_CONVENTION = (
    "FlopCounterMode: forward + backward of every matmul, convolution and attention kernel as executed without "
    "activation checkpointing (attention over the full T x T square)"
)


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


def count_step_flops(model_cfg: dict, activation_checkpointing: bool = False) -> float:
    """Hardware FLOPs of forward + backward for one sample, counted on fake tensors (nothing is allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = model_spec(model_cfg)
    x, y = spec.synthetic_batch(model_cfg, 1, torch.Generator().manual_seed(0))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model = build_model(model_cfg)
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            for block in model_blocks(model, model_cfg):
                checkpoint(block)
        with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
            loss_fn(model(mode.from_tensor(x)), mode.from_tensor(y)).backward()
    return float(counter.get_total_flops())


def flop_counts(model_cfg: dict, activation_checkpointing: bool) -> dict:
    """Per-sample model and hardware FLOPs of one training step, and the model FLOPs' convention."""
    spec = model_spec(model_cfg)
    hardware = count_step_flops(model_cfg, activation_checkpointing)
    if spec.model_flops_per_sample is not None:
        model, convention = spec.model_flops_per_sample(model_cfg), spec.flops_convention
    else:
        model = hardware if not activation_checkpointing else count_step_flops(model_cfg, False)
        convention = COUNTER_CONVENTION
    return {"model_flops_per_sample": float(model), "hardware_flops_per_sample": hardware,
            "flops_convention": convention}


def step_flops(run) -> dict:
    """The step's FLOP counts per sample (`flop_counts`) for a resolved run, counted by the controller once per
    model configuration and cached under `<results_dir>/.cache/flops/`: the ranks never pay for it, and it is
    counted after they ended, so it cannot slow them."""
    from bench.results import cached_json

    cfg = run.config
    key = {"model": cfg["model"], "activation_checkpointing": cfg["activation_checkpointing"],
           "torch": torch.__version__}
    return cached_json(cfg["results_dir"], "flops", key,
                       lambda: flop_counts(cfg["model"], cfg["activation_checkpointing"]))
