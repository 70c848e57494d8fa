"""Peak dense TFLOP/s per device and precision: the MFU denominator.

Vendor datasheet numbers without sparsity. A wrong denominator is the most common MFU complaint, so an
unknown device gets no MFU (and a warning) rather than a guess; set `peak_tflops=` to supply one.
"""

from __future__ import annotations

import re

# (substring of torch.cuda.get_device_name(), {precision: dense peak TFLOP/s}); most specific first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM: "H100 80GB HBM3"
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
]


def lookup_peak_tflops(device_name: str, precision: str) -> float | None:
    for key, peaks in PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(key)}\b", device_name):  # "A10" must not match "A100" or "A10G"
            return peaks.get(precision)
    return None


def tflops_per_device(flops_per_step: float, step_time_s: float, world_size: int) -> float:
    """Achieved model TFLOP/s per device: the global step's model FLOPs over the step time and devices."""
    return flops_per_step / step_time_s / world_size / 1e12


def mfu_pct(achieved_tflops: float, peak_tflops: float | None) -> float | None:
    return None if not peak_tflops else 100.0 * achieved_tflops / peak_tflops
