"""The activations a rank holds for backward, at least: the largest output of the model's blocks, counted on fake
tensors, for the memory check's floor (`bench.plan.bound.bound_mb`)."""

from __future__ import annotations

from bench.measure.memory import no_large_tensors


def largest_block_output_bytes(run) -> tuple[float, int]:
    """(The largest output of the model's blocks in one sample's forward, in bytes; how many blocks), the model
    built on the meta device, run on fake tensors under the run's autocast, the sample made fake (made for real,
    as `bench.models.model_sizes` makes it, it took 48 GiB at model.seq_len=2**31)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_leaves

    from bench.models import build_on_meta
    from bench.strategies.base import autocast_dtype

    sent: list[float] = []

    def output_bytes(_module, _inputs, out) -> None:
        sent.append(float(sum(t.nbytes for t in tree_leaves(out) if isinstance(t, torch.Tensor))))

    dtype = autocast_dtype(run.config["precision"])
    with no_large_tensors():
        model = build_on_meta(run.config["model"])
    with FakeTensorMode(allow_non_fake_inputs=True), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        module = run.materialize(model, "cpu")
        x, _ = run.model.synthetic_batch(run.config["model"], 1, torch.Generator().manual_seed(0))
        for block in run.model.blocks_of(module):
            block.register_forward_hook(output_bytes)
        with torch.no_grad():
            module(x)
    return max(sent, default=0.0), len(run.model.blocks_of(module))
