"""Every strategy trains the same model as one device: real runs (2 gloo ranks; 2-D on 4) with verify=true, which
compare each step's loss and the final parameters with a single-device run of the same seed and data.

All cases are jobs of ONE Hydra multirun (one `python -m bench -m` process): each case is a config file of a
`case` group written for the test and selected with `+case=<name>`, so the controller starts once and the
single-device references (one per model and data) are run once and cached for every case that shares them.
"""

import json
from pathlib import Path

import pytest

from bench.measure.parity import TOLERANCE
from bench.strategies import strategy_spec
from conftest import compose_plain, read_rows
from strategy_cases import CASES, COMMON, REFUSED

# one worker runs this module's tests and shares its multirun (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("strategy_cases")


@pytest.fixture
def rows(strategy_rows) -> dict[str, dict]:
    """Every case's row, by case name: one multirun for all of them (conftest.py)."""
    return strategy_rows


PARITY_CASES = [name for name, o in CASES.items() if o.get("verify", True) and name not in REFUSED]


@pytest.mark.parametrize("case", PARITY_CASES)
def test_every_strategy_matches_one_device(rows, case):
    row = rows[case]
    assert row["status"] == "ok", row["error"]
    assert row["parity_ok"], {k: v for k, v in row.items() if k.startswith("parity")}
    assert row["parity_max_rel_diff"] <= row["parity_tolerance"]
    assert row["parity_tolerance"] == TOLERANCE["sgd"][strategy_spec(row["strategy"]).parity], "the strategy's class"


def test_the_row_names_the_zero_stage_the_hsdp_mesh_and_an_offload_that_changed_nothing(rows):
    facts = rows["hsdp_zero2_gpt"]["strategy_facts"]
    assert facts["zero_stage"] == 2 and facts["mesh"] == "dp_replicate=2 x dp_shard=2 x tp=1"
    assert facts["offload"].startswith("no effect: on the CPU")
    assert rows["fsdp_gpt"]["strategy_facts"]["zero_stage"] == 3
    assert rows["zero_gpt"]["strategy_facts"]["zero_stage"] == 1


def test_a_context_parallel_row_names_its_degree_its_sequence_and_its_memory(rows, tmp_path):
    from bench.plan.memory import predicted_memory_mb
    from bench.run import prepare

    row = rows["fsdp_cp_gpt"]
    assert (row["cp"], row["seq_len"], row["strategy_facts"]["mesh"]) == (2, 64, "dp=2 x cp=2 x tp=1")
    assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 64)
    assert rows["fsdp_gpt"]["cp"] == 1
    case = [f"{key}={value}" for key, value in CASES["fsdp_cp_gpt"].items()]
    predicted, _ = predicted_memory_mb(prepare(compose_plain(*COMMON, *case, f"results_dir={tmp_path}")))
    assert predicted["total"] == pytest.approx(row["peak_mem_mb"], rel=0.1), "simulated with each rank's chunks"


def test_an_expert_parallel_gpt_holds_half_the_experts_and_counts_their_tokens(rows, tmp_path):
    from bench.plan.memory import predicted_memory_mb
    from bench.run import prepare

    ep, single = rows["fsdp_ep_tp_moe_gpt"], rows["fsdp_gpt"]
    assert ep["strategy_facts"]["mesh"] == "dp=2 x tp=2" and ep["ep"] == 2
    case = [f"{key}={value}" for key, value in CASES["fsdp_ep_tp_moe_gpt"].items()]
    predicted, _ = predicted_memory_mb(prepare(compose_plain(*COMMON, *case, f"results_dir={tmp_path}")))
    assert predicted["total"] == pytest.approx(ep["peak_mem_mb"], rel=0.1)
    load = ep["strategy_facts"]["expert_load"]
    assert sorted(load) == ["blocks.0.ff.experts", "blocks.1.ff.experts"]
    assert all(len(layer["tokens"]) == 4 and layer["max_over_mean"] >= 1 for layer in load.values())
    assert ep["model_flops_per_step"] > single["model_flops_per_step"], "2 experts' gated MLPs a token, not 1 MLP"


@pytest.mark.parametrize("model", ["gpt"])
def test_what_each_strategy_holds_per_rank(rows, model):
    """At the peak of a step: FSDP shards the optimizer state (and holds its shard of the parameters plus the
    blocks it has gathered at that moment); ZeRO shards only the optimizer state; tensor parallelism splits the
    weights."""
    ddp, fsdp, zero, tensor = (rows[f"{s}_{model}"] for s in ("ddp", "fsdp", "zero", "tensor"))
    assert fsdp["mem_optim_mb"] < 0.75 * ddp["mem_optim_mb"]
    assert fsdp["peak_mem_mb"] < ddp["peak_mem_mb"]
    assert zero["mem_optim_mb"] < 0.75 * ddp["mem_optim_mb"]
    assert zero["mem_params_mb"] == pytest.approx(ddp["mem_params_mb"])
    assert tensor["mem_params_mb"] < 0.75 * ddp["mem_params_mb"]


def test_ddp_rows_and_step_records(rows):
    """A 2-rank run's row and steps.csv: the step time is the slowest rank's, every rank has its log."""
    row = rows["ddp_gpt"]
    assert (row["world_size"], row["backend"], row["omp_num_threads"], row["devices"]) == (2, "gloo", 1, 2)
    steps = (Path(row["run_dir"]) / "steps.csv").read_text().splitlines()
    header, *records = [line.split(",") for line in steps]
    assert len(records) == row["steps"]
    for record in records:
        step = dict(zip(header, record, strict=True))
        per_rank = [float(step["step_time_ms_rank0"]), float(step["step_time_ms_rank1"])]
        assert float(step["step_time_ms"]) == pytest.approx(max(per_rank), abs=1e-3)
    assert (Path(row["run_dir"]) / "logs" / "rank1.log").is_file()


def test_token_models_report_tokens_and_flops(rows):
    row = rows["ddp_gpt"]
    seq_len = row["config"]["model"]["seq_len"]
    assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * seq_len)
    assert row["tokens_per_s_per_device"] == pytest.approx(row["tokens_per_s"] / 2)
    expected = row["model_flops_per_step"] / (row["step_time_ms_mean"] / 1e3) / 2 / 1e12
    assert row["tflops_per_device"] == pytest.approx(expected) and row["tflops_per_device"] > 0
    assert row["hardware_flops_per_step"] > row["model_flops_per_step"], "the counter's full square of attention"
    assert row["flops_convention"].startswith("6NT + 12LT^2d")
    assert row["mfu_pct"] is None, "no peak is known for this CPU: no MFU rather than a guess"


def test_three_d_layouts_resolve_their_degrees(rows):
    facts = rows["fsdp_tp_pp_gpt"]["strategy_facts"]
    assert (facts["dp"], facts["tp"], facts["pp"], facts["stages"]) == (2, 2, 2, 2)
    assert facts["dp_gradient_sync"].startswith("FSDP2")
    # ranks dp-major over (dp, pp, tp): the last stage's two tensor-parallel ranks of each replica hold its loss
    ranks = sorted(Path(rows["fsdp_tp_pp_gpt"]["run_dir"]).glob("ranks/rank*.json"), key=lambda p: int(p.stem[4:]))
    assert [json.loads(p.read_text())["holds_loss"] for p in ranks] == [False, False, True, True] * 2


@pytest.mark.parametrize("case,stages", [("pipeline_gpt", 2), ("1f1b_mlp", 2),
                                         ("interleaved_mlp", 4)])
def test_pipeline_schedules_report_their_stages(rows, case, stages):
    facts = rows[case]["strategy_facts"]
    assert facts["stages"] == stages and facts["schedule"] == CASES[case].get("strategy.schedule", "gpipe")
    assert 0 < facts["bubble_fraction"] < 1


def test_a_combination_that_cannot_run_is_a_skipped_row(rows):
    row = rows["1f1b_dp_mlp"]
    assert row["status"] == "skipped" and row["error"].startswith("strategy.microbatches: expected")


@pytest.mark.parametrize("case", ["dataparallel_gpt", "modelparallel_gpt"])
def test_one_process_strategies_say_they_ran_on_one_cpu(rows, case):
    row = rows[case]
    assert (row["world_size"], row["devices"]) == (1, 1)
    facts = row["strategy_facts"]
    if case == "dataparallel_gpt":
        assert "no GPU" in facts["note"]
    else:
        assert facts["stage_devices"] == ["cpu", "cpu"] and "not parallelism" in facts["note"]


def test_file_data_waits_are_measured(rows):
    for case in ("ddp_knobs_files_cnn",):
        assert rows[case]["data_wait_pct"] > 0


@pytest.mark.parametrize("case", ["fsdp_bf16_gpt"])
def test_mixed_precision_runs(rows, case):
    row = rows[case]
    assert row["status"] == "ok" and row["matmul_precision"] == "bf16"
    assert 0 < row["loss_last"] < 10


def test_rows_stay_in_the_sweeps_file(rows):
    sweep = Path(rows["ddp_gpt"]["run_dir"]).parent
    assert all(Path(r["run_dir"]).parent == sweep for r in rows.values() if r["status"] != "skipped")
    assert len(read_rows(sweep / "runs.jsonl")) == len(CASES)
