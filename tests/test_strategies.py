"""Every strategy trains the same model as one device: real 2-rank (2-D: 4-rank) gloo runs with verify=true,
which compare each step's loss and the final parameters with a single-device run of the same seed and data."""

import pytest
from conftest import read_rows, run_bench

pytestmark = pytest.mark.slow

COMMON = ("steps=4", "warmup=1", "global_batch=16", "verify=true")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One results folder for the module, so each model's single-device reference runs once."""
    return tmp_path_factory.mktemp("strategies")


def sweep_rows(results, *overrides):
    before = set((results / "sweeps").glob("*")) if (results / "sweeps").exists() else set()
    proc = run_bench("-m", *COMMON, *overrides, results_dir=results, timeout=600)  # later keys win
    (sweep,) = set((results / "sweeps").glob("*")) - before
    return proc, read_rows(sweep / "runs.jsonl")


def assert_parity(row):
    assert row["status"] == "ok", row["error"]
    assert row["parity_ok"], (row["strategy"], row["parity_max_rel_diff"], row["parity_tolerance"])
    assert row["parity_max_rel_diff"] <= row["parity_tolerance"]


@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_data_and_tensor_parallel_strategies_match_one_device(results, model):
    proc, rows = sweep_rows(results, "strategy=ddp,fsdp,zero,tensor", "launch.nproc=2", f"model={model}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["strategy"] for r in rows] == ["ddp", "fsdp", "zero", "tensor"]
    for row in rows:
        assert_parity(row)
    ddp, fsdp, zero, tensor = rows
    # what each strategy holds per rank: FSDP shards parameters, gradients and optimizer state; ZeRO only the
    # optimizer state; tensor parallelism splits the layers' weights
    assert fsdp["mem_params_mb"] < 0.75 * ddp["mem_params_mb"]
    assert fsdp["mem_optim_mb"] < 0.75 * ddp["mem_optim_mb"]
    assert zero["mem_optim_mb"] < 0.75 * ddp["mem_optim_mb"]
    assert zero["mem_params_mb"] == pytest.approx(ddp["mem_params_mb"])
    assert tensor["mem_params_mb"] < 0.75 * ddp["mem_params_mb"]


def test_two_d_fsdp_with_tensor_parallel_on_four_ranks(results):
    proc, (row,) = sweep_rows(results, "strategy=fsdp", "launch.nproc=4", "parallel.tp=2", "model=gpt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert row["config"]["parallel"] == {"dp": 2, "tp": 2, "pp": 1}
    assert_parity(row)


def test_sequence_parallel_and_knobs_keep_parity(results):
    proc, rows = sweep_rows(
        results, "strategy=tensor", "model=gpt", "launch.nproc=2", "strategy.sequence_parallel=true",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_parity(rows[0])
    # gradient accumulation, activation checkpointing and torch.compile (aot_eager: seconds, not minutes)
    proc, rows = sweep_rows(results, "strategy=ddp", "model=gpt", "launch.nproc=2", "grad_accum=2",
                            "activation_checkpointing=true", "compile=true", "compile_backend=aot_eager")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_parity(rows[0])


def test_dataparallel_says_it_ran_on_one_cpu_device(results):
    proc, (row,) = sweep_rows(results, "strategy=dataparallel", "model=mlp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_parity(row)
    assert (row["world_size"], row["devices"]) == (1, 1)
    assert "no GPU" in row["strategy_facts"]["note"]


def test_file_data_feeds_every_rank_the_same_global_batches(results):
    proc, rows = sweep_rows(results, "strategy=ddp,fsdp", "data=files", "launch.nproc=2", "model=cnn",
                            "steps=6", "data.samples=64")  # 4 steps per epoch: the second epoch reshuffles
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in rows:
        assert_parity(row)
        assert row["data_wait_pct"] > 0


def test_mixed_precision_runs(results):
    proc, rows = sweep_rows(results, "strategy=fsdp,ddp", "launch.nproc=2", "model=gpt", "precision=bf16",
                            "verify=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in rows:
        assert row["status"] == "ok" and row["matmul_precision"] == "bf16"
        assert 0 < row["loss_last"] < 10
