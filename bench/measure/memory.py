"""Where a rank's memory goes: the bytes of the tensors it holds, by kind, at the peak of one training step.

torch's MemTracker (`torch.distributed._tools.mem_tracker`) follows every tensor's storage through a dispatch
mode and files it under parameters, buffers, gradients, optimizer states, activations, temporaries or other;
its "peak" snapshot is that breakdown at the moment the total was highest. Counting tensors, not the
process's RSS or the allocator's cache, shows what a strategy holds on CPU and GPU alike (FSDP's shards,
ZeRO's optimizer shard) without changing how the timed steps run: bench tracks one extra step after them.
"""

from __future__ import annotations

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
