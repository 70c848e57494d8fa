"""Users' models: Hugging Face architectures from their configs (a Llama, a GPT-2, a Mixtral mixture of experts,
a Qwen3) and a module from outside the project (`tests/yournet.py` through model=custom), each shrunk to a few
hundred KB, under every strategy that applies to it: 2 gloo ranks (2-D on 4) with verify=true, so each trains
the same model as one device does. Built on the meta device, each rank materialises only what it holds: the
memory case shows it. All cases are jobs of one multirun (see `conftest.run_cases`)."""

import sys

import pytest
import torch

from bench.checks import validate
from bench.errors import ConfigError
from conftest import REPO, compose_plain, materialized, run_cases

# one worker runs this module's tests and shares its multirun (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("your_models")

COMMON = ["steps=4", "warmup=1", "global_batch=8", "launch.omp_num_threads=1"]
TESTS = REPO / "tests"

LLAMA = {"model": "hf", "model.seq_len": 16}  # conf/model/hf.yaml: a 2-layer Llama of width 64
GPT2 = {"model": "gpt2", "model.seq_len": 16, "model.config.vocab_size": 128, "model.config.n_embd": 32,
        "model.config.n_layer": 2, "model.config.n_head": 2, "model.config.n_positions": 32}
MIXTRAL = {"model": "mixtral-8x7b", "model.seq_len": 16, "model.config.vocab_size": 128,
           "model.config.hidden_size": 32, "model.config.intermediate_size": 32, "model.config.num_hidden_layers": 2,
           "model.config.num_attention_heads": 4, "model.config.num_key_value_heads": 2,
           "model.config.num_local_experts": 4}
QWEN3 = {"model": "qwen3-0.6b", "model.seq_len": 16, "model.config.vocab_size": 128, "model.config.hidden_size": 32,
         "model.config.intermediate_size": 64, "model.config.num_hidden_layers": 2,
         "model.config.num_attention_heads": 4, "model.config.num_key_value_heads": 2, "model.config.head_dim": 8,
         "model.config.tie_word_embeddings": False}
YOURNET = {"model": "custom", "model.module": {"_target_": "yournet.build", "vocab": 64, "width": 32, "depth": 2},
           "model.inputs": {"kind": "tokens", "vocab_size": 64, "seq_len": 16}, "model.init_std": None,
           "model.tp_plan": {"layers.*.up": "colwise", "layers.*.down": "rowwise"},
           "model.pipeline": {"pre": ["embed"], "post": ["norm", "out"]}}
UNTIED = {"model.config.tie_word_embeddings": False}
TWO = {"launch.nproc": 2}

CASES = {
    "fsdp_llama": {**LLAMA, **TWO, "strategy": "fsdp", "activation_checkpointing": True},
    "tensor_llama": {**LLAMA, **TWO, "strategy": "tensor"},
    "gpipe_llama": {**LLAMA, **TWO, "strategy": "pipeline"},
    "fsdp_tp_llama": {**LLAMA, "strategy": "fsdp", "launch.nproc": 4, "parallel.tp": 2},
    "ddp_llama": {**LLAMA, **TWO, "strategy": "ddp", "grad_accum": 2, "compile": True, "compile_backend": "aot_eager"},
    "fsdp_gpt2": {**GPT2, **TWO, "strategy": "fsdp"},  # tied embedding and head
    "fsdp_mixtral": {**MIXTRAL, **TWO, "strategy": "fsdp"},
    "tensor_qwen3": {**QWEN3, **TWO, "strategy": "tensor"},  # per-head q/k norms: gradients summed over tp
    "fsdp_yournet": {**YOURNET, **TWO, "strategy": "fsdp"},
    "tensor_yournet": {**YOURNET, **TWO, "strategy": "tensor"},
    "gpipe_yournet": {**YOURNET, **TWO, "strategy": "pipeline"},
}
# A Llama of 84 M parameters (336 MB) whose weights dominate what a rank holds before its first step.
BIG = {**LLAMA, "model.config.vocab_size": 8192, "model.config.hidden_size": 1024, "model.config.num_hidden_layers": 4,
       "model.config.intermediate_size": 4096, "model.config.num_attention_heads": 8,
       "model.config.num_key_value_heads": 8, "model.seq_len": 8, "global_batch": 2, "steps": 1, "warmup": 0,
       "verify": False}
MEMORY = {"memory_fsdp": {**BIG, **TWO, "strategy": "fsdp"}}


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[str, dict]:
    env = {"PYTHONPATH": f"{TESTS}:{sys.path[0]}"}  # yournet.py lives here, outside the bench package
    return run_cases(tmp_path_factory.mktemp("yours"), {**CASES, **MEMORY}, COMMON, env=env)


# ------------------------------------------------------------------------------------------- clear errors


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
    (["model=custom", "strategy=pipeline"], "model.pipeline: expected the modules before and after the blocks"),
    (["model=custom", "strategy=pipeline", "model.pipeline={pre:[embed]}"], "model.pipeline: expected submodule"),
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
