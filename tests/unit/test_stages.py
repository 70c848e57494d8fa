"""The model cut into stages (strategy=pipeline, strategy=modelparallel): the split itself, in-process. Their
real runs against one device are in test_parity.py."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.errors import ConfigError
from bench.models import Split, build_model, build_on_meta, model_spec
from bench.strategies.modelparallel import InProcessPipeline
from bench.strategies.schedules import idle_ratio, stages_of
from bench.strategies.stages import bubble_fraction, build_stages, check_split, partition, stage_block_ids
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
    assert bubble_fraction(idle_ratio("1f1b", 2, 4, 1)) == pytest.approx(1 / 5)
    assert bubble_fraction(idle_ratio("interleaved", 4, 8, 2)) == pytest.approx(3 / 19)
    # zero bubble with T_F = T_B = T_W (the papers' tables): ZB-H1 a third of 1F1B's idle time, ZB-V and DualPipeV none
    assert idle_ratio("interleaved_zb", 4, 8, 2) == pytest.approx(idle_ratio("interleaved", 4, 8, 2) / 3)
    assert idle_ratio("zbv", 4, 8, 2) == idle_ratio("dualpipev", 4, 8, 2) == 0.0
    assert stages_of("zbv", 4, 1, 2) == [1, 6] and stages_of("interleaved_zb", 4, 1, 2) == [1, 5]


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
    def __init__(self, kind: str):
        super().__init__()
        self.fc, self.kind = nn.Linear(4, 4), kind

    def forward(self, h: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(h) + position) * mask


class Decoder(nn.Module):
    """A Hugging Face layout: blocks nested under `model.layers`, called with more than the hidden states (a
    shared rotary module's output, a mask per layer kind), and a forward that does more around them (an
    embedding multiplier, a soft-cap on the logits): what a hand split loses."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(10, 4)
        self.model.rotary = Rotary()
        self.model.layers = nn.ModuleList(Layer(kind) for kind in ("full", "sliding", "full"))
        self.lm_head = nn.Linear(4, 10)

    def forward(self, ids: torch.Tensor) -> dict:
        h = self.model.embed(ids) * 12.0
        masks = {"full": torch.ones(ids.shape[1], 1), "sliding": (torch.arange(ids.shape[1]) % 2).unsqueeze(1)}
        for layer in self.model.layers:
            h = layer(h, self.model.rotary(h), masks[layer.kind])
        return {"logits": 30.0 * torch.tanh(self.lm_head(h) / 30.0)}


def _decoder_spec(split: Split):
    return SimpleNamespace(pipeline_split=split, blocks="model.layers", blocks_of=lambda m: m.model.layers)


def test_a_split_by_the_models_own_forward_keeps_what_it_does_around_the_blocks():
    split = Split(pre=("model.embed",), post=("lm_head",), input_like=lambda h: torch.zeros(h.shape[:2]).long())
    torch.manual_seed(0)
    model, ids = Decoder(), torch.randint(0, 10, (2, 5))
    for n_stages, blocks in [(2, [[0, 1], [2]]), (3, [[0], [1], [2]])]:
        stages = build_stages(model, _decoder_spec(split), n_stages)
        assert [stage_block_ids(s) for s in stages] == blocks
        assert sorted(n for s in stages for n, _ in s.named_parameters()) == sorted(
            n for n, _ in model.named_parameters())
        h = ids
        for stage in stages:
            h = stage(h)
        torch.testing.assert_close(h, model(ids)["logits"], rtol=0, atol=0)


class Scaled(nn.Module):
    """Blocks that take the hidden states alone, in a forward that scales the embedding."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed = nn.Embedding(10, 4)
        self.model.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.lm_head = nn.Linear(4, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed(ids) * 12.0
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(h)


@pytest.mark.parametrize("net, refusal", [(Scaled, "whose stages compute its forward"),
                                          (Decoder, "whose forward runs stage by stage")])
def test_a_hand_split_that_is_not_the_forward_is_refused_before_launch(monkeypatch, net, refusal):
    """A model cut by hand (embedding, blocks called with the hidden states alone, head) computes another model
    than its forward, or fails: `check_split` runs both on a small instance and refuses the run."""
    import bench.strategies.stages as stages_module

    hand = Split(pre=("model.embed",), post=("lm_head",), embed=lambda m, ids: m.model.embed(ids),
                 head=lambda m, h: m.lm_head(h))
    spec = _decoder_spec(hand)
    spec.build = lambda cfg: net()
    spec.synthetic_batch = lambda cfg, n, gen: (torch.randint(0, 10, (n, 5), generator=gen), None)
    spec.small_config = None
    monkeypatch.setattr(stages_module, "model_spec", lambda cfg: spec)
    monkeypatch.setattr(stages_module, "meta_instance", lambda cfg: net())
    with pytest.raises(ConfigError, match=f"model: expected a model {refusal} with strategy=pipeline"):
        check_split({"model": {"name": "yours"}, "strategy": {"name": "pipeline"}}, 3, 2)
