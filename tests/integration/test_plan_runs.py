"""Each rank's memory predicted before the run (`bench.plan.memory`) against what the shared multirun's runs
measured, `python -m bench.plan` and `bench.plan.check` on those runs, and the refusal of a run predicted not to
fit. The search, on a strategy and a launcher added as one file each: test_one_file.py."""

import json
import shutil

import pytest

from bench.plan.memory import predicted_memory_mb
from bench.run import prepare
from bench.strategies import strategy_names, strategy_spec
from conftest import compose_plain, run_bench
from strategy_cases import CASES, COMMON, REFUSED

# one worker runs this module's tests and shares its multirun (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("strategy_cases")


def case_overrides(case: dict, results_dir) -> list[str]:
    """The case as command-line overrides; the predictions' cache under `results_dir`."""
    pairs = (f"{key}={value}" for key, value in case.items() if not isinstance(value, dict))
    return [*COMMON, *pairs, "force=true", f"results_dir={results_dir}"]


@pytest.fixture(scope="module")
def measured_collectives(tmp_path_factory):
    """This machine's collectives over 2 gloo ranks, measured once (`python -m bench.comm`): what
    `plan.network=measured` fits."""
    folder = tmp_path_factory.mktemp("comm")
    proc = run_bench("launch.nproc=2", "comm.max_bytes=65536", module="bench.comm", results_dir=folder)
    assert proc.returncode == 0, proc.stderr
    return folder


@pytest.mark.parametrize("name", [name for name in CASES if name not in REFUSED])
def test_the_prediction_is_within_ten_percent_of_the_measured_peak(strategy_rows, name, tmp_path):
    """Every case the strategy's `memory` says is predicted (the files-data case too: its batches are predicted as
    the synthetic ones, shaped alike); one it says is not stays unpredicted, with the strategy's reason."""
    row = strategy_rows[name]
    assert row["status"] == "ok", row["error"]
    run = prepare(compose_plain(*case_overrides(CASES[name], tmp_path)))
    predicted, why = predicted_memory_mb(run)
    if run.strategy.memory(run).how == "not predicted":
        assert predicted is None and why
        return
    assert predicted["total"] == pytest.approx(row["peak_mem_mb"], rel=0.10), (predicted, row["peak_mem_mb"])


def test_a_run_predicted_not_to_fit_is_refused_in_one_line_before_it_starts(tmp_path):
    """The issue's case: a 100,000-token GPT sequence grew one rank to 18.4 GB of this machine's 23 GB."""
    proc = run_bench("model=gpt", "model.seq_len=100000", "force=false", results_dir=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("bench: invalid config: memory: expected a run that fits in ") and "force=true" in line
    assert not list(tmp_path.rglob("ranks")), "no rank started"


def test_bench_plan_lists_each_layout_and_agrees_with_the_measured_runs(tmp_path, strategy_rows,
                                                                       measured_collectives):
    import pandas as pd

    from bench.plan.__main__ import main


    # this machine's collectives, measured (bench.comm), and the shared multirun's rows, as a user's results hold
    shutil.copy(measured_collectives / "comm.jsonl", tmp_path)
    with (tmp_path / "runs.jsonl").open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in strategy_rows.values())
    assert main([*COMMON, "model=gpt", "plan.world_sizes=[1,2,1024]", "plan.activation_checkpointing=[false]",
                 "plan.device_tflops=0.05", f"results_dir={tmp_path}"]) == 0
    (folder,) = (tmp_path / "plans").iterdir()
    table = pd.read_csv(folder / "plan.csv")
    plan = table[table["world_size"] <= 2].set_index("strategy")
    planned = sorted(name for name in strategy_names() for world in (1, 2)
                     for _ in strategy_spec(name).layouts(world, None))  # every layout each strategy declares
    assert sorted(plan.index) == planned
    assert plan.loc["pipeline", "status"] == "fits" and plan.loc["pipeline", "predicted_bubble_ms"] > 0
    two = plan[plan["world_size"] == 2]
    assert "single" not in two.index and plan.loc["single", "predicted_comm_ms"] == 0
    assert two.loc["tensor", "predicted_comm_ms"] > two.loc["ddp", "predicted_comm_ms"] > 0, "TP: every layer"
    assert ((two["predicted_step_ms"] - two["overhead_ms"]) / two["overhead_factor"]
            >= two["predicted_compute_ms"]).all(), "before calibration"
    assert (folder / "projection.png").stat().st_size > 10_000
    refused = table[table["world_size"] == 1024].set_index("strategy")
    assert set(refused["status"]) == {"refused"}, "global_batch=16 does not split over 1,024 ranks"
    for name in two.index.unique():  # the same configs as the multirun's generated cases, 2 ranks
        assert two.loc[name, "status"] == "fits"
        assert two.loc[name, "predicted_peak_mb"] == pytest.approx(strategy_rows[f"{name}_gpt"]["peak_mem_mb"],
                                                                  rel=0.10), name
    assert two.loc["fsdp", "optim_mb"] == pytest.approx(plan.loc["single", "optim_mb"] / 2, rel=0.01), "sharded"

    # bench.plan.check: the same layouts' predictions beside these runs. The GPT has no run at another world
    # size, and other models' runs do not calibrate a throughput assumed (plan.device_tflops): all a priori.
    from bench.plan.check import main as check

    assert check([*COMMON, "model=gpt", "plan.world_sizes=[2]", "plan.activation_checkpointing=[false]",
                  "plan.device_tflops=0.05", f"results_dir={tmp_path}"]) == 0
    (checked,) = (tmp_path / "plans").glob("*_check")
    table = pd.read_csv(checked / "check.csv").set_index("strategy")
    assert sorted(table.index) == sorted(two.index.unique())
    assert (table["runs"] == 1).all(), "tensor_sp_gpt is another variant of tensor, not this layout's run"
    assert (table["memory_error_pct"].abs() < 10).all()
    assert table.loc["ddp", "measured_step_ms"] == strategy_rows["ddp_gpt"]["step_time_ms_p50"]
    assert (table["calibrated_by"] == "nothing measured to calibrate by").all()
    assert (table["calibrated_step_ms"] == table["predicted_step_ms"]).all()
    assert "layouts: step time a priori |error| mean" in (checked / "check.md").read_text()
