"""Each rank's memory predicted before the run (`bench.plan.memory`), against what the runs measured, and the
refusal of a run predicted not to fit."""

import pytest

from bench.controller import prepare
from bench.plan.memory import SIMULATED, memory_refusal, predicted_memory_mb
from conftest import compose_plain, run_bench
from strategy_cases import CASES, COMMON

# The cases of the shared multirun whose strategy is predicted: their measured peaks are the reference.
PREDICTED = [name for name, case in CASES.items()
             if case["strategy"] in (*SIMULATED, "ddp", "zero") and case.get("data") is None]


def case_overrides(case: dict, results_dir) -> list[str]:
    """The case as command-line overrides; the predictions' cache under `results_dir`."""
    pairs = (f"{key}={value}" for key, value in case.items() if not isinstance(value, dict))
    return [*COMMON, *pairs, "force=true", f"results_dir={results_dir}"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PREDICTED)
def test_the_prediction_is_within_ten_percent_of_the_measured_peak(strategy_rows, name, tmp_path):
    row = strategy_rows[name]
    assert row["status"] == "ok", row["error"]
    predicted = predicted_memory_mb(prepare(compose_plain(*case_overrides(CASES[name], tmp_path))))
    assert predicted["total"] == pytest.approx(row["peak_mem_mb"], rel=0.10), (predicted, row["peak_mem_mb"])


def test_a_run_predicted_not_to_fit_is_refused_in_one_line_before_it_starts(tmp_path):
    """The issue's case: a 100,000-token GPT sequence grew one rank to 18.4 GB of this machine's 23 GB."""
    proc = run_bench("model=gpt", "model.seq_len=100000", "force=false", results_dir=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("bench: invalid config: memory: expected a run that fits in ") and "force=true" in line
    assert not list(tmp_path.rglob("ranks")), "no rank started"


def test_the_refusal_names_the_prediction_and_what_to_change():
    predicted = {"params": 512.0, "grads": 0.0, "optim": 512.0, "activations": 20480.0, "temp": 0.5, "total": 21504.5}
    assert memory_refusal(predicted, 32768.0, "x") is None
    line = memory_refusal(predicted, 8192.0, "8.0 GB available on this machine / 1 rank(s)")
    assert line == ("memory: expected a run that fits in 8.0 GB per rank (8.0 GB available on this machine / 1 "
                    "rank(s)), got a predicted peak of 21.0 GB on rank 0 (params 0.50, optim 0.50, activations "
                    "20.00 GB). Lower global_batch or the model's sizes, or shard it (strategy=fsdp, zero, tensor), "
                    "or pass force=true to run anyway.")


def test_strategies_not_simulated_yet_are_not_predicted(tmp_path):
    cfg = prepare(compose_plain("strategy=pipeline", "launch.nproc=2", "force=true", f"results_dir={tmp_path}"))
    assert predicted_memory_mb(cfg) is None


def test_a_prediction_is_cached_by_what_it_depends_on(tmp_path):
    cfg = prepare(compose_plain("force=true", f"results_dir={tmp_path}"))
    first = predicted_memory_mb(cfg)
    (cached,) = (tmp_path / ".cache" / "memory").glob("*.json")
    assert predicted_memory_mb({**cfg, "steps": 99}) == first, "steps change nothing predicted"
    cached.write_text('{"predicted": {"total": 1.0}}')
    assert predicted_memory_mb(cfg) == {"total": 1.0}, "read back, not simulated again"
    assert predicted_memory_mb({**cfg, "global_batch": 32})["total"] < first["total"]


@pytest.mark.slow
def test_bench_plan_lists_each_layout_and_agrees_with_the_measured_runs(tmp_path, strategy_rows):
    import pandas as pd

    from bench.plan.__main__ import main

    assert main([*COMMON, "model=gpt", "plan.world_sizes=[1,2]", "plan.activation_checkpointing=[false]",
                 f"results_dir={tmp_path}"]) == 0
    (folder,) = (tmp_path / "plans").iterdir()
    plan = pd.read_csv(folder / "plan.csv").set_index("strategy")
    assert sorted(plan.index) == ["ddp", "fsdp", "pipeline", "single", "tensor", "zero"]
    assert plan.loc["pipeline", "status"] == "not predicted"
    for name in ("ddp", "fsdp", "zero", "tensor"):  # the same configs as the multirun's cases, 2 ranks
        assert plan.loc[name, "status"] == "fits"
        measured = strategy_rows[f"{name}_gpt"]["peak_mem_mb"]
        assert plan.loc[name, "predicted_peak_mb"] == pytest.approx(measured, rel=0.10), name
    assert plan.loc["fsdp", "optim_mb"] == pytest.approx(plan.loc["single", "optim_mb"] / 2, rel=0.01), "sharded"


def test_bench_plan_refuses_what_it_cannot_plan_in_one_line(tmp_path):
    proc = run_bench("plan.strategies=[nope]", module="bench.plan", results_dir=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "bench.plan: invalid config: plan.strategies: expected some of single, ddp, zero, fsdp, tensor, pipeline, "
        "got ['nope']. Change `plan.strategies=` on the command line."]
