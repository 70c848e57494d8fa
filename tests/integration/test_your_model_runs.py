"""Users' models: Hugging Face architectures from their configs (a Llama, a GPT-2, a Mixtral mixture of experts,
a Qwen3) and a module from outside the project (`tests/yournet.py` through model=custom), each shrunk to a few
hundred KB, under every strategy that applies to it: 2 gloo ranks (2-D on 4) with verify=true, so each trains
the same model as one device does. Built on the meta device, each rank materialises only what it holds: the
memory case shows it. All cases are jobs of one multirun (see `conftest.run_cases`)."""

import sys

import pytest

from conftest import REPO, compose_plain, run_cases
from your_models import GPT2, LLAMA, MIXTRAL, QWEN3, YOURNET, held_out

# one worker runs this module's tests and shares its multirun (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("your_models")

COMMON = ["steps=4", "warmup=1", "global_batch=8", "launch.omp_num_threads=1"]
TESTS = REPO / "tests"

TWO = {"launch.nproc": 2}

CASES = {
    # eager attention, a logit soft-cap, per-layer kinds: what the model's own forward does around its layers
    "gpipe_gemma2": {**held_out("gemma2"), **TWO, "strategy": "pipeline"},
    # 3-D: FSDP x tensor x pipeline, 2 x 2 x 2 (64 tokens a sample: at 16 the prediction's few fixed KB were 13 %)
    "fsdp_tp_pp_llama": {**LLAMA, "strategy": "pipeline", "launch.nproc": 8, "parallel.dp": 2, "parallel.tp": 2,
                         "parallel.pp": 2, "strategy.fsdp": True, "strategy.microbatches": 2, "model.seq_len": 64},
    "fsdp_gpt2": {**GPT2, **TWO, "strategy": "fsdp"},  # tied embedding and head
    "fsdp_mixtral": {**MIXTRAL, **TWO, "strategy": "fsdp"},
    # expert parallelism: 2 ranks each holding 2 of a layer's 4 experts, 2 replicas of them, FSDP over the 4
    "fsdp_ep_mixtral": {**MIXTRAL, "strategy": "fsdp", "launch.nproc": 4, "parallel.ep": 2},
    # context parallelism through transformers' attention interface, rotary positions of each rank's chunks, the
    # keys and values passed around the ranks (torch's ring attention; the suite's fsdp_cp_gpt gathers them)
    "fsdp_cp_llama": {**LLAMA, **TWO, "strategy": "fsdp", "parallel.cp": 2, "strategy.cp_method": "ring"},
    # per-head q/k norms: gradients summed over tp (32 tokens a sample, predicted +3.9 %, the same peak in 3 runs:
    # at 16, -10.05 % once, 86 KB of 0.86 MB)
    "tensor_qwen3": {**QWEN3, **TWO, "strategy": "tensor", "model.seq_len": 32},
    "tensor_yournet": {**YOURNET, **TWO, "strategy": "tensor"},
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_model_trains_as_on_one_device_under_every_strategy(rows, case):
    row = rows[case]
    assert row["status"] == "ok", row["error"]
    assert row["parity_ok"], {k: v for k, v in row.items() if k.startswith("parity")}


def test_a_context_parallel_row_names_how_its_keys_and_values_moved(rows):
    assert rows["fsdp_cp_llama"]["strategy_facts"]["cp_method"] == "ring" and rows["fsdp_cp_llama"]["cp"] == 2


def test_an_expert_parallel_row_counts_each_layers_tokens_per_expert(rows):
    """Rank 0's tokens x 2 choices each, in every step it ran (4, and the step its memory is tracked in), per
    expert of each of the 2 layers; none dropped."""
    load = rows["fsdp_ep_mixtral"]["strategy_facts"]["expert_load"]
    assert sorted(load) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for layer in load.values():
        tokens = layer["tokens"]
        assert len(tokens) == 4 and sum(tokens) == 5 * 2 * 16 * 2, "5 steps x 2 samples x 16 tokens x top-2"
        assert layer["max_over_mean"] == pytest.approx(max(tokens) / (sum(tokens) / 4)) and layer["dropped"] == 0
    # each rank's 2 experts of a layer sharded over the 2 replicas holding them: a quarter of every weight, as FSDP
    # over 4 ranks holds (here: half of what the 2-rank FSDP run holds)
    assert rows["fsdp_ep_mixtral"]["mem_params_mb"] == pytest.approx(rows["fsdp_mixtral"]["mem_params_mb"] / 2,
                                                                     rel=0.1)


def test_each_rank_allocates_only_what_it_holds(rows):
    """Built on the meta device, sharded, then materialised: an FSDP rank of 2 takes about half of the model's
    bytes before its first step. Measured against the model's bytes, which is what one device takes (Llama 3.2
    1B in the README: 4,728 MB for 4,714 MB of weights), rather than against a single-device run (9 s more of
    the suite). Half the weights plus what FSDP and the process group hold themselves, which does not shrink
    with the model: 184 MB was measured for 320 MB of weights (0.575), so the bound, 0.625, leaves that 8 %
    for this machine's noise (the README's Llama 3.2 1B: 0.51). The lower bound shows the measure sees the
    half."""
    fsdp = rows["memory_fsdp"]
    model_mb = fsdp["params"] * 4 / 2**20
    assert fsdp["params"] > 80e6
    assert 0.4 * model_mb <= fsdp["setup_peak_mb"] <= 0.625 * model_mb, (fsdp["setup_peak_mb"], model_mb)


def test_rows_name_the_preset_and_count_the_flops_of_active_experts(rows):
    assert rows["fsdp_mixtral"]["model"] == "mixtral-8x7b" and rows["tensor_yournet"]["model"] == "custom"
    assert rows["fsdp_tp_pp_llama"]["config"]["parallel"] == {"dp": 2, "tp": 2, "pp": 2, "cp": 1, "dp_replicate": 1,
                                                               "ep": 1}
    mixtral = rows["fsdp_mixtral"]
    assert mixtral["flops_convention"].startswith("6NT + 12LT^2d")
    # Both counts take the 2 routed experts of 4 per token: the analytic one at top-k / experts, the counter
    # the batched matmuls it runs (0.95 apart). Counting every expert puts them 1.43x apart; grouped_mm, none of them.
    assert 0.8 < mixtral["model_flops_per_step"] / mixtral["hardware_flops_per_step"] < 1.2
    assert rows["gpipe_gemma2"]["strategy_facts"]["stages"] == 2


@pytest.mark.parametrize("case", ["fsdp_tp_pp_llama", "gpipe_gemma2", "tensor_qwen3", "fsdp_mixtral", "fsdp_cp_llama",
                                  "fsdp_ep_mixtral"])
def test_each_models_memory_is_predicted_within_ten_percent(rows, case, tmp_path):
    """bench.plan.memory on models from outside bench's own: 3-D (each stage FSDP x tensor on a 2-D mesh), the
    pipeline's stages, tensor-parallel Qwen3, a context-parallel Llama (each rank its chunks), a Mixtral whole and
    expert-parallel (its tokens spread evenly over the experts: a simulation has no values to route by)."""
    from bench.plan.memory import predicted_memory_mb
    from bench.run import prepare

    pairs = [f"{key}={value}" for key, value in CASES[case].items()]
    predicted, _ = predicted_memory_mb(prepare(compose_plain(*COMMON, *pairs, "force=true", f"results_dir={tmp_path}")))
    assert predicted["total"] == pytest.approx(rows[case]["peak_mem_mb"], rel=0.10), (predicted, rows[case])
