"""bench's initialisation (`bench.models.init`): any box of a parameter holds the values the whole parameter
holds there, and every model's weights follow the rule it declares."""

import pytest
import torch

from bench.models import init as bench_init
from bench.models import model_names, model_spec
from conftest import compose_plain, materialized


@pytest.mark.parametrize("shape,offset,size", [
    ((50, 7), (13, 0), (30, 7)),      # an FSDP shard: a run of rows
    ((20, 3), (3, 1), (5, 2)),        # a tensor-parallel slice of columns
    ((4, 6, 5), (1, 2, 1), (2, 3, 3)),  # a box in 3-D (experts x rows x columns)
])
def test_a_box_holds_what_the_whole_parameter_holds_there(monkeypatch, shape, offset, size):
    monkeypatch.setattr(bench_init, "BLOCK_VALUES", 16)  # many blocks, so boxes cross block edges
    for std in (0.02, None):
        whole = bench_init.draw("w", torch.Size(shape), (0,) * len(shape), shape, 7, std, torch.device("cpu"))
        box = bench_init.draw("w", torch.Size(shape), offset, size, 7, std, torch.device("cpu"))
        torch.testing.assert_close(box, whole[tuple(slice(o, o + n) for o, n in zip(offset, size, strict=True))],
                                   rtol=0, atol=0)
    other = bench_init.draw("w", torch.Size(shape), (0,) * len(shape), shape, 8, 0.02, torch.device("cpu"))
    assert not torch.equal(other, whole), "another seed, other values"


@pytest.mark.parametrize("name", model_names())
def test_every_model_is_drawn_by_the_rule_it_declares(name):
    cfg = compose_plain(f"model={name}")["model"]
    std = model_spec(cfg).init_std
    if name in ("gpt", "custom", "hf"):
        assert std == 0.02, "nanoGPT's N(0, 0.02); custom.yaml's init_std; the Llama config's initializer_range"
    model = materialized(cfg)
    for pname, p in model.named_parameters():
        if p.dim() < 2:
            assert torch.all(p == (0.0 if pname.endswith("bias") else 1.0)), pname
        elif std is not None:
            assert abs(p.std().item() - std) < 0.25 * std, pname
        else:
            assert p.abs().max().item() <= 1 / p[0].numel() ** 0.5, pname
