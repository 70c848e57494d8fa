"""FLOPs of one training step by two stated conventions, counted without allocating the model.

- Hardware FLOPs: what the device executes, as torch's FlopCounterMode counts one forward and backward of the
  model (matmuls, convolutions, attention kernels) built under FakeTensorMode on the CPU: no memory, no
  compute. Activation-checkpointing recompute is included; attention is counted over the whole T x T square
  as the fused kernels compute it, plus flash attention's recompute of QK^T in its backward. The optimizer
  and elementwise ops are not counted.
- Model FLOPs: what the model needs, recompute not counted: the model's own analytic count where its module
  defines `model_flops_per_sample` (the GPT: 6NT + 12LT^2d, see its FLOPS_CONVENTION), else the hardware count
  of the step without activation checkpointing (`COUNTER_CONVENTION`).

MFU divides the model FLOPs by the step time and the peak; HFU does the same with the hardware FLOPs.

Some models that train cannot run on fake tensors (transformers builds DeepSeek-V3's causal mask explicitly
there, and with a mask repeats its key/value heads by `num_attention_heads / num_key_value_heads`, heads its
attention already has: shapes no real step produces). Their model FLOPs are then the model's analytic count where
it has one and their hardware FLOPs None; with no analytic count, both are None. `flops_method` says which
counted, `flops_error` why the counter could not: a count that fails never loses the run's row.
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


# What a count may come from, in order: a change makes older cached counts stale.
METHODS = ("FlopCounterMode", "model_flops_per_sample", "full-square attention, causal beside", "experts' part")


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
    return count_step_flops_and_experts(model_cfg, activation_checkpointing)[0]


def count_step_flops_and_experts(model_cfg: dict, activation_checkpointing: bool = False) -> tuple[float, float]:
    """(`count_step_flops`, the part of it in the mixture-of-experts layers' experts: 0 for a dense model). A
    model deeper than a few blocks is counted at shallower depths, one block apart, until three agree on the
    FLOPs of one more block (a few first blocks may differ: DeepSeek-V3's dense ones), and extrapolated: its
    blocks are identical, and a 70B Llama's 80 blocks took minutes to count whole."""
    spec = model_spec(model_cfg)
    depth = spec.depth(model_cfg) if spec.with_blocks is not None else 0
    counts: dict[int, tuple[float, float]] = {}
    n = 2
    while n + 2 < depth:
        for d in (n, n + 1, n + 2):
            if d not in counts:
                counts[d] = count_whole_step_flops(spec.with_blocks(model_cfg, d), activation_checkpointing)
        block = counts[n + 2][0] - counts[n + 1][0]
        if abs(block - (counts[n + 1][0] - counts[n][0])) <= 1e-6 * counts[n + 2][0]:
            experts = counts[n + 2][1] - counts[n + 1][1]
            return counts[n + 2][0] + (depth - n - 2) * block, counts[n + 2][1] + (depth - n - 2) * experts
        n += 1
    return count_whole_step_flops(model_cfg, activation_checkpointing)


def count_whole_step_flops(model_cfg: dict, activation_checkpointing: bool = False) -> tuple[float, float]:
    """`count_step_flops_and_experts` of the whole model, as it runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.parallel.experts import expert_layers

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
    by_module = counter.get_flop_counts()  # by the module's path under its class's name, nested ones included
    experts = sum(sum(by_module.get(f"{type(model).__name__}.{path}", {}).values()) for path in expert_layers(model))
    return float(counter.get_total_flops()), float(experts)


def flop_counts(model_cfg: dict, activation_checkpointing: bool) -> dict:
    """Per-sample model and hardware FLOPs of one training step, the model FLOPs' convention, `flops_method`
    (FlopCounterMode: the step counted on fake tensors; model_flops_per_sample: the counter failed and the model's
    analytic count stands alone; None: nothing counted) and `flops_error` (why a count failed, else None). Never
    raises: a count is null rather than the run's row lost."""
    spec = model_spec(model_cfg)
    errors: list[str] = []
    both = _or_none(errors, "FlopCounterMode on fake tensors", count_step_flops_and_experts, model_cfg,
                    activation_checkpointing, pair=True)
    hardware, experts = both if both is not None else (None, None)
    model, causal, convention = None, None, None
    if spec.model_flops_per_sample is not None:
        model = _or_none(errors, "model_flops_per_sample", spec.model_flops_per_sample, model_cfg)
        convention = spec.flops_convention if model is not None else None
        causal = _or_none(errors, "model_flops_per_sample(causal=True)", spec.model_flops_per_sample, model_cfg,
                          True) if model is not None else None
    elif hardware is not None:
        model = hardware if not activation_checkpointing else _or_none(
            errors, "FlopCounterMode on fake tensors", count_step_flops, model_cfg, False)
        convention = COUNTER_CONVENTION if model is not None else None
    method = "FlopCounterMode" if hardware is not None else "model_flops_per_sample" if model is not None else None
    return {"model_flops_per_sample": model, "model_flops_causal_per_sample": causal,
            "hardware_flops_per_sample": hardware, "expert_flops_per_sample": experts,
            "flops_convention": convention, "flops_method": method,
            "flops_error": "; ".join(errors) or None}


def _or_none(errors: list[str], what: str, count, *args, pair: bool = False):
    """`count(*args)` as a float (a pair of floats), or None with why appended to `errors`: the model's own code
    runs in a count, and whatever it raises stops only that count."""
    try:
        return tuple(map(float, count(*args))) if pair else float(count(*args))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        errors.append(f"{what}: {type(exc).__name__}: {first}")
        return None


def step_flops(run) -> dict:
    """The step's FLOP counts per sample (`flop_counts`) for a resolved run, counted by the controller once per
    model configuration and cached under `<results_dir>/.cache/flops/`: the ranks never pay for it, and it is
    counted after they ended, so it cannot slow them."""
    from bench.results import cached_json

    cfg = run.config
    key = {"model": cfg["model"], "activation_checkpointing": cfg["activation_checkpointing"],
           "torch": torch.__version__, "methods": METHODS}
    return cached_json(cfg["results_dir"], "flops", key,
                       lambda: flop_counts(cfg["model"], cfg["activation_checkpointing"]))
