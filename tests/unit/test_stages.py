"""The model cut into stages (strategy=pipeline, strategy=modelparallel): the split itself, in-process. Their
real runs against one device are in test_parity.py."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.models import Split, build_model, build_on_meta, model_spec
from bench.strategies.modelparallel import InProcessPipeline
from bench.strategies.stages import bubble_fraction, build_stages, partition, stage_block_ids
from conftest import materialized

MODELS = {
    "mlp": {"name": "mlp", "in_features": 16, "hidden": 32, "layers": 4, "classes": 5},
    "gpt": {"name": "gpt", "vocab_size": 50, "seq_len": 8, "d_model": 16, "n_layers": 4, "n_heads": 2,
            "mlp_ratio": 2},
    "cnn": {"name": "cnn", "image_size": 8, "in_channels": 3, "width": 8, "blocks": 4, "classes": 5, "groups": 2},
}


def test_partition_and_bubble():
    assert partition(4, 2) == [[0, 1], [2, 3]]
    assert partition(5, 3) == [[0, 1], [2, 3], [4]]
    assert partition(4, 4) == [[0], [1], [2], [3]]
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)


def _model_and_input(name: str):
    torch.manual_seed(0)
    cfg = MODELS[name]
    x, _ = model_spec(cfg).synthetic_batch(cfg, 6, torch.Generator().manual_seed(1))
    return build_model(cfg), x


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_stages_keep_the_full_models_names_and_compute_its_forward(name, n_stages):
    model, x = _model_and_input(name)
    stages = build_stages(model, model_spec(MODELS[name]), n_stages)
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter once, same name
    assert [i for s in stages for i in stage_block_ids(s)] == list(range(4))
    h = x
    for stage in stages:
        h = stage(h)
    torch.testing.assert_close(h, model(x), rtol=0, atol=0)


@pytest.mark.parametrize("split_size", [None, 1, 4])
def test_inprocess_pipeline_matches_the_model(split_size):
    model, x = _model_and_input("gpt")
    expected = model(x)
    stages = build_stages(model, model_spec(MODELS["gpt"]), 2)
    pipe = InProcessPipeline(model, stages, ["cpu", "cpu"], split_size)
    assert [n for n, _ in pipe.module.named_parameters()] == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(pipe(x), expected)


def test_a_rank_allocates_only_its_own_stage_with_the_single_builds_values():
    cfg = {"model": MODELS["gpt"], "seed": 3}
    whole = materialized(cfg["model"], seed=3)
    model = build_on_meta(cfg["model"])
    stages = build_stages(model, model_spec(cfg["model"]), 2)
    materialized(cfg["model"], seed=3, module=stages[1])
    assert all(p.is_meta for p in stages[0].parameters())
    expected = dict(whole.named_parameters())
    for name, p in stages[1].named_parameters():
        assert not p.is_meta and torch.equal(p, expected[name]), name


def test_stage_autocast():
    model, x = _model_and_input("mlp")
    (plain,) = build_stages(model, model_spec(MODELS["mlp"]), 1)
    (mixed,) = build_stages(model, model_spec(MODELS["mlp"]), 1, autocast_dtype=torch.bfloat16, device_type="cpu")
    assert plain(x).dtype == torch.float32
    assert mixed(x).dtype == torch.bfloat16


class Rotary(nn.Module):
    """A parameter-free module every block needs (like a decoder's rotary embedding)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.ones_like(h)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, h: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(h) + position)


class Decoder(nn.Module):
    """Blocks nested under `model.layers` whose call needs more than the hidden states: a Hugging Face layout."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(10, 4)
        self.model.rotary = Rotary()
        self.model.layers = nn.ModuleList(Layer() for _ in range(3))
        self.lm_head = nn.Linear(4, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed(ids)
        for layer in self.model.layers:
            h = run_layer(self, layer, h)
        return self.lm_head(h)


def run_layer(m: nn.Module, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return layer(h, m.model.rotary(h))


def test_a_split_with_nested_paths_block_arguments_and_shared_modules():
    split = Split(pre=("model.embed",), embed=lambda m, ids: m.model.embed(ids), post=("lm_head",),
                  head=lambda m, h: m.lm_head(h), run_block=run_layer, shared=("model.rotary",))
    spec = SimpleNamespace(pipeline_split=split, blocks="model.layers", blocks_of=lambda m: m.model.layers)
    torch.manual_seed(0)
    model, ids = Decoder(), torch.randint(0, 10, (2, 5))
    stages = build_stages(model, spec, 2)
    assert [stage_block_ids(s) for s in stages] == [[0, 1], [2]]
    assert sorted(n for s in stages for n, _ in s.named_parameters()) == sorted(n for n, _ in model.named_parameters())
    assert all(isinstance(s.get_submodule("model.rotary"), Rotary) for s in stages), "every stage holds it"
    torch.testing.assert_close(stages[1](stages[0](ids)), model(ids), rtol=0, atol=0)
