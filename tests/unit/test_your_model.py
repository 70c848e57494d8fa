"""Users' models in-process (tests/your_models.py): what a model cannot do refused in one line, the custom
contract's batches and blocks, a Hugging Face model's stages against its own forward. Their real runs under every
strategy: tests/integration/test_your_model_runs.py."""

import sys

import pytest
import torch

from bench.checks import validate
from bench.errors import ConfigError
from conftest import REPO, compose_plain, materialized
from your_models import GPT2, LLAMA, MIXTRAL, QWEN3, UNTIED

TESTS = REPO / "tests"

def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(compose_plain("launch.nproc=2", *overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides,start", [
    (["model=gpt2", "strategy=pipeline"], "model: expected a model whose first and last layers share no weight"),
    (["model=gpt2", "strategy=tensor"], "model: expected a Hugging Face architecture that ships a tensor-parallel"),
    (["model=llama3.2-1b", "strategy=tensor"], "model.config.tie_word_embeddings: expected false"),
    (["model=mixtral-8x7b", "strategy=tensor"], "model: expected tensor-parallel styles among"),
    (["model=qwen3-0.6b", "strategy=fsdp", "launch.nproc=4", "parallel.tp=2",
      "model.config.tie_word_embeddings=false"], "parallel.tp: expected 1 with strategy=fsdp"),
    (["model=hf", "model.config.model_type=lama"], "model.config.model_type: expected an architecture"),
    (["model=hf", "+model.config.num_layers=2"], "model.config.num_layers: expected a key LlamaConfig takes"),
    (["model=hf", "model.config.num_attention_heads=3"], "model.config: expected sizes a llama config accepts"),
    (["model=hf", "model.seq_len=100000"], "model.seq_len: expected at most max_position_embeddings=256"),
    (["model=hf", "strategy=tensor", "model.config.num_key_value_heads=1", "model.config.num_attention_heads=2"],
     "model.config.num_key_value_heads: expected a multiple of the tensor-parallel degree 2"),
    (["model=custom", "model.module._target_=mypkg.nets.build"], "model.module._target_: expected the dotted path"),
    (["model=custom", "+model.module.width=3"], "model.module: expected keyword arguments bench.models.gpt.GPT"),
    (["model=custom", "model.inputs.kind=images"], "model.inputs.kind: expected one of tokens, dense"),
    (["model=custom", "model.blocks=norm"], "model.blocks: expected the path of an nn.ModuleList"),
    (["model=custom", "strategy=tensor"], "model.tp_plan: expected a tensor-parallel plan"),
    (["model=custom", "strategy=tensor", "model.tp_plan={blocks.*.ffn:colwise}"],
     "model.tp_plan: expected module-name patterns that match"),
    (["model=custom", "strategy=pipeline"], "model.split: expected the modules before and after the blocks"),
    (["model=custom", "strategy=pipeline", "model.split={pre:[embed]}"], "model.split: expected submodule"),
])
def test_what_a_model_cannot_do_is_refused_in_one_line(overrides, start):
    assert refused(*overrides).startswith(start)


def test_without_transformers_the_line_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    assert refused("model=llama3-8b") == ('model=hf (the Hugging Face presets) needs transformers, which is not '
                                          'installed here: pip install -e ".[hf]"')


# ------------------------------------------------------------------------------------- the custom contract


def _built(*overrides: str):
    """The model and a batch as a rank gets them: built on meta, materialised, a batch from its inputs."""
    from bench.models import loss_fn, model_spec

    cfg = compose_plain("model=custom", *overrides)
    validate(cfg)
    model = materialized(cfg["model"])
    x, y = model_spec(cfg["model"]).synthetic_batch(cfg["model"], 3, torch.Generator().manual_seed(0))
    return model, x, y, loss_fn(model(x), y)


def test_a_dense_model_with_its_own_arguments(monkeypatch):
    model, x, y, loss = _built("model.module._target_=bench.models.mlp.MLP", "+model.module.in_features=12",
                               "+model.module.hidden=8", "+model.module.layers=2", "+model.module.classes=5",
                               "model.inputs.kind=dense", "model.inputs.shape=[12]", "model.inputs.classes=5")
    assert x.shape == (3, 12) and y.shape == (3,) and torch.isfinite(loss)
    assert len(model.blocks) == 2  # found: the largest nn.ModuleList


def test_a_users_own_batch_function(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    model, x, y, loss = _built("model.module._target_=yournet.build", "model.inputs._target_=yournet.batch")
    assert x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1]) and torch.isfinite(loss)


@pytest.mark.parametrize("preset", [LLAMA, {**GPT2, **UNTIED}, MIXTRAL, QWEN3],
                         ids=["llama", "gpt2", "mixtral", "qwen3"])
def test_the_stages_of_a_hugging_face_model_compute_its_own_forward(preset):
    """The split read off the model (its _pp_plan; GPT-2's by hand) against the model's own forward: what
    strategy=pipeline runs (the pipeline cases above run it on 2 ranks)."""
    from bench.models import model_spec
    from bench.strategies.stages import build_stages

    overrides = [f"model={preset['model']}"] + [f"{k}={v}" for k, v in preset.items() if k != "model"]
    cfg = compose_plain(*overrides)
    model = materialized(cfg["model"])
    x, _ = model_spec(cfg["model"]).synthetic_batch(cfg["model"], 2, torch.Generator().manual_seed(0))
    hidden = x
    for stage in build_stages(model, model_spec(cfg["model"]), 2):
        hidden = stage(hidden)
    torch.testing.assert_close(hidden, model(x).logits, rtol=1e-5, atol=1e-5)
