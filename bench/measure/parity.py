"""Parity: proof that a strategy trains the same model as one device.

With `verify=true` the controller also runs `strategy=single` on the same seed, global batch, data and
steps (fp32, deterministic algorithms; cached per configuration, see `bench.verify`) and compares, step by
step, the global-batch loss and, at the end, every parameter gathered unsharded.

Both differences are relative: |loss - loss_ref| / |loss_ref| at the worst step, and for parameters the
largest max|p - p_ref| / max|p_ref| over the model's tensors.

Tolerances, per optimizer and per kind of split:
- SGD is linear in the gradient, so a different summation order only perturbs the last bits: 1e-5 for
  data-parallel strategies (an all-reduce instead of one batched sum), 1e-4 for tensor and pipeline
  splits (partial sums in another order through several layers).
- Adam-family optimizers divide by sqrt(v): for parameters whose gradient is near zero that normalisation
  amplifies rounding differences up to the learning rate's scale (3e-5 absolute on parameters of scale
  ~0.02 was seen after a few steps), so 2e-3 for every split.
"""

from __future__ import annotations

from pathlib import Path

import torch

TOLERANCE = {
    "sgd": {"data": 1e-5, "model": 1e-4},
    "adamw": {"data": 2e-3, "model": 2e-3},
}


def loss_rel_diff(losses: list[float], reference: list[float]) -> float:
    if len(losses) != len(reference):
        raise ValueError(f"{len(losses)} losses to compare with {len(reference)} reference losses")
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference, strict=True))


def param_rel_diff(params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    if params.keys() != reference.keys():
        missing, extra = sorted(reference.keys() - params.keys()), sorted(params.keys() - reference.keys())
        raise ValueError(f"parameter names differ from the single run: missing {missing[:5]}, extra {extra[:5]}")
    worst = 0.0
    for name, ref in reference.items():
        p = params[name]
        if p.shape != ref.shape:
            raise ValueError(f"parameter {name}: shape {tuple(p.shape)} vs {tuple(ref.shape)} in the single run")
        scale = ref.abs().max().item()
        worst = max(worst, (p.float() - ref.float()).abs().max().item() / max(scale, 1e-12))
    return worst


def parity_fields(cfg, losses: list[float], params_file: Path, ref_losses: list[float],
                  ref_params_file: Path, kind: str) -> dict:
    """Row fields: the differences, the tolerance that applies and the verdict."""
    loss_diff = loss_rel_diff(losses, ref_losses)
    # weights_only: a parameters file is tensors and names, nothing a pickle could run
    params, ref_params = (torch.load(f, weights_only=True) for f in (params_file, ref_params_file))
    param_diff = param_rel_diff(params, ref_params)
    tolerance = TOLERANCE.get(cfg["optim"]["name"], TOLERANCE["adamw"])[kind]
    worst = max(loss_diff, param_diff)
    return {
        "parity_loss_max_rel_diff": loss_diff,
        "parity_param_max_rel_diff": param_diff,
        "parity_max_rel_diff": worst,
        "parity_tolerance": tolerance,
        "parity_ok": worst <= tolerance,
    }
