"""Users' models in-process (tests/your_models.py): what a model cannot do refused in one line, the custom
contract's batches and blocks, a Hugging Face model's stages against its own forward. Their real runs under every
strategy: tests/integration/test_your_model_runs.py."""

import sys
import threading

import pytest
import torch

from bench.checks import validate
from bench.errors import ConfigError
from conftest import REPO, compose_plain, materialized
from your_models import GPT2, HELD_OUT, LLAMA, MIXTRAL, QWEN3, UNTIED, held_out

TESTS = REPO / "tests"
YOURNET_SIZES = ["+model.module.vocab=64", "+model.module.width=32", "+model.module.depth=2",
                 "model.inputs.vocab_size=64", "model.inputs.seq_len=16"]

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
    (["model=hf", "model.config.model_type=olmoe", "strategy=tensor"], "model: expected tensor-parallel styles among"),
    (["model=qwen3-0.6b", "strategy=fsdp", "launch.nproc=4", "parallel.tp=2",
      "model.config.tie_word_embeddings=false"], "parallel.tp: expected 1 with strategy=fsdp"),
    (["model=hf", "model.config.model_type=lama"], "model.config.model_type: expected an architecture"),
    (["model=hf", "+model.config.num_layers=2"], "model.config.num_layers: expected a key LlamaConfig takes"),
    (["model=hf", "model.config.num_attention_heads=3"], "model.config: expected sizes a llama config accepts"),
    (["model=hf", "model.seq_len=100000"], "model.seq_len: expected at most max_position_embeddings=256"),
    (["model=hf", "strategy=tensor", "model.config.num_key_value_heads=1", "model.config.num_attention_heads=2"],
     "model.config.num_key_value_heads: expected a multiple of the tensor-parallel degree 2"),
    (["model=hf", "model.config.num_hidden_layers=0"], "model.config.num_hidden_layers: expected a positive integer"),
    (["model=hf", "model.config.vocab_size=0"], "model.config.vocab_size: expected a positive integer"),
    (["model=hf", "model.config.num_key_value_heads=3"], "model.config.num_key_value_heads: expected a divisor of "
     "num_attention_heads=4"),
    (["model=hf", "model.config.model_type=phi3"], "model.config.pad_token_id: expected a token id below "
     "vocab_size=512"),
    (["model=custom", "model.module._target_=mypkg.nets.build"], "model.module._target_: expected the dotted path"),
    (["model=custom", "model.module._target_=yournet.Tied", *YOURNET_SIZES, "strategy=tensor",
      "model.tp_plan={embed:embedding_rowwise,out:colwise_gather_output}"],
     "model.tp_plan: expected a plan that splits no weight two modules share"),
    (["model=custom", "model.module._target_=yournet.Keyed", *YOURNET_SIZES, "+model.module.key=out"],
     "model.module._target_: expected a model whose forward returns logits"),
    (["model=custom", "model.module._target_=yournet.exits"], "model.module: expected keyword arguments "
     "yournet.exits accepts and a constructor that returns (SystemExit: 3)"),
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
    refused("model=llama3-8b")  # its configs made once in this process: the refusal still comes
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


STAGED = {"llama": LLAMA, "gpt2": {**GPT2, **UNTIED}, "mixtral": MIXTRAL, "qwen3": QWEN3,
          **{arch: held_out(arch) for arch in HELD_OUT},
          # a module of the user's, its split declared in the config (pre/post; no embed or head function)
          "yournet": {"model": "custom", "model.module._target_": "yournet.build", "+model.module.vocab": 64,
                      "+model.module.width": 32, "+model.module.depth": 2, "model.inputs.vocab_size": 64,
                      "model.inputs.seq_len": 16, "model.split": "{pre:[embed],post:[norm,out]}"}}


@pytest.mark.parametrize("name", sorted(STAGED))
def test_the_stages_of_a_model_compute_its_own_forward(name):
    """Each architecture (and a module of the user's), tiny, cut into stages as strategy=pipeline cuts it (the check
    before launch passes, then its stages run one after another here) against the model's own forward: what the
    forward does around its layers (masks, multipliers, soft-caps, per-layer rotary embeddings) is kept. A 2-rank
    pipeline run of one of them (gemma2) is in tests/integration/test_your_model_runs.py."""
    from bench.models import logits_of, model_spec
    from bench.strategies.stages import build_stages

    preset = STAGED[name]
    overrides = [f"model={preset['model']}"] + [f"{k}={v}" for k, v in preset.items() if k != "model"]
    cfg = compose_plain(*overrides, "strategy=pipeline", "launch.nproc=2")
    validate(cfg)
    model = materialized(cfg["model"])
    x, _ = model_spec(cfg["model"]).synthetic_batch(cfg["model"], 2, torch.Generator().manual_seed(0))
    hidden = x
    for stage in build_stages(model, model_spec(cfg["model"]), min(3, len(model_spec(cfg["model"]).blocks_of(model)))):
        hidden = stage(hidden)
    torch.testing.assert_close(hidden, logits_of(model(x)), rtol=1e-5, atol=1e-5)


def test_a_dict_output_trains_on_its_logits():
    model, x, y, loss = _built("model.module._target_=yournet.Keyed", *YOURNET_SIZES, "+model.module.key=logits")
    assert isinstance(model(x), dict) and torch.isfinite(loss)


def test_a_stage_sends_a_contiguous_activation():
    """A ViT's patch embedding as timm writes it hands the blocks a transposed view; torch's isend takes only
    contiguous tensors."""
    from bench.models import model_spec
    from bench.strategies.stages import build_stages

    cfg = compose_plain("model=custom", "model.module._target_=yournet.Patches", "model.inputs.kind=dense",
                        "model.inputs.shape=[3,8,8]", "model.inputs.classes=5", "strategy=pipeline", "launch.nproc=2",
                        "model.split={pre:[patch],post:[head],embed:yournet.embed_patches,head:yournet.classify}")
    validate(cfg)
    model = materialized(cfg["model"])
    x, _ = model_spec(cfg["model"]).synthetic_batch(cfg["model"], 2, torch.Generator().manual_seed(0))
    first, last = build_stages(model, model_spec(cfg["model"]), 2)
    sent = first(x)
    assert sent.is_contiguous()
    torch.testing.assert_close(last(sent), model(x))


def test_the_users_constructor_runs_once_per_process():
    """Every question bench asks of the model (its blocks, its split, its checks) reads one meta build; the
    strategy's own copy of it is copied, not built again."""
    import yournet

    from bench.models import build_on_meta
    from bench.run import prepare

    cfg = compose_plain("model=custom", "model.module._target_=yournet.counted", "+model.module.width=40",
                        "+model.module.depth=3", "model.inputs.vocab_size=64", "strategy=ddp", "launch.nproc=2")
    yournet.BUILDS.clear()
    run = prepare(cfg)
    build_on_meta(run.config["model"])
    build_on_meta(run.config["model"])
    assert len(yournet.BUILDS) == 1


def test_a_constructor_that_does_not_return_is_refused_in_time(monkeypatch, capsys):
    import bench.models.custom as custom

    monkeypatch.setattr(custom, "BUILD_NOTICE_S", 0.1)
    monkeypatch.setattr(custom, "BUILD_TIMEOUT_S", 1.0)
    assert refused("model=custom", "model.module._target_=yournet.slow", "+model.module.seconds=2").startswith(
        "model.module._target_: expected a constructor that returns within 1 s on the meta device")
    assert "bench: building the model (yournet.slow) on the meta device, waiting at most 1 s" in capsys.readouterr().err
    for thread in threading.enumerate():  # the build puts parameters on meta while it runs: let it end here
        if thread.name == "bench-build-model":
            thread.join()


def test_threads_the_models_code_left_do_not_hold_the_controller():
    import subprocess

    script = ("import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
              "from bench.app import exit_when_done; exit_when_done(0)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "exiting without waiting for threads" in done.stderr
