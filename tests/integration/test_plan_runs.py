"""Each rank's memory predicted before the run (`bench.plan.memory`), against what the runs measured, and the
refusal of a run predicted not to fit."""

import json
import shutil

import pytest

from bench.controller import prepare
from bench.plan.memory import SIMULATED, predicted_memory_mb
from conftest import compose_plain, read_rows, run_bench
from strategy_cases import CASES, COMMON

# one worker runs this module's tests and shares its multirun (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("strategy_cases")

# The cases of the shared multirun whose strategy is predicted: their measured peaks are the reference (the
# files-data case too: its batches are predicted as the synthetic ones, shaped alike).
PREDICTED = [name for name, case in CASES.items()
             if case["strategy"] in (*SIMULATED, "ddp", "zero", "pipeline")
             and name != "1f1b_dp_mlp"]  # that one is refused, a `skipped` row


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


@pytest.mark.slow
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
    assert sorted(plan.index) == ["ddp", "fsdp", "fsdp", "pipeline", "single", "tensor", "zero"]
    assert plan.loc["pipeline", "status"] == "fits" and plan.loc["pipeline", "predicted_bubble_ms"] > 0
    two = plan[plan["world_size"] == 2]
    assert "single" not in two.index and plan.loc["single", "predicted_comm_ms"] == 0
    assert two.loc["tensor", "predicted_comm_ms"] > two.loc["ddp", "predicted_comm_ms"] > 0, "TP: every layer"
    assert ((two["predicted_step_ms"] - two["overhead_ms"]) / two["overhead_factor"]
            >= two["predicted_compute_ms"]).all(), "before calibration"
    assert (folder / "projection.png").stat().st_size > 10_000
    refused = table[table["world_size"] == 1024].set_index("strategy")
    assert set(refused["status"]) == {"refused"}, "global_batch=16 does not split over 1,024 ranks"
    for name in ("ddp", "fsdp", "zero", "tensor", "pipeline"):  # the same configs as the multirun's cases, 2 ranks
        assert two.loc[name, "status"] == "fits"
        measured = strategy_rows[f"{name}_gpt" if name != "pipeline" else "gpipe_gpt"]["peak_mem_mb"]
        assert two.loc[name, "predicted_peak_mb"] == pytest.approx(measured, rel=0.10), name
    assert two.loc["fsdp", "optim_mb"] == pytest.approx(plan.loc["single", "optim_mb"] / 2, rel=0.01), "sharded"

    # bench.plan.check: the same layouts' predictions beside these runs. The GPT has no run at another world
    # size, and other models' runs do not calibrate a throughput assumed (plan.device_tflops): all a priori.
    from bench.plan.check import main as check

    assert check([*COMMON, "model=gpt", "plan.world_sizes=[2]", "plan.activation_checkpointing=[false]",
                  "plan.device_tflops=0.05", f"results_dir={tmp_path}"]) == 0
    (checked,) = (tmp_path / "plans").glob("*_check")
    table = pd.read_csv(checked / "check.csv").set_index("strategy")
    assert sorted(table.index) == ["ddp", "fsdp", "pipeline", "tensor", "zero"]
    assert (table["runs"] == 1).all(), "tensor_sp_gpt is another variant of tensor, not this layout's run"
    assert (table["memory_error_pct"].abs() < 10).all()
    assert table.loc["ddp", "measured_step_ms"] == strategy_rows["ddp_gpt"]["step_time_ms_p50"]
    assert (table["calibrated_by"] == "nothing measured to calibrate by").all()
    assert (table["calibrated_step_ms"] == table["predicted_step_ms"]).all()
    assert "layouts: step time a priori |error| mean" in (checked / "check.md").read_text()


@pytest.mark.slow
def test_bench_search_runs_the_best_layouts_finds_the_frontier_and_resumes(tmp_path, measured_collectives):
    """From a fresh results folder, as a user: the collectives measured, then the search over 2 ranks."""
    shutil.copy(measured_collectives / "comm.jsonl", tmp_path)
    # 0.1 GB a rank: the GPT's frontier lies near 70 samples a replica, where a probe takes seconds
    search = ["model=gpt", "global_batch=32", "plan.world_sizes=[2]", "plan.strategies=[ddp,fsdp]",
              "plan.activation_checkpointing=[false]", "plan.device_tflops=0.02", "plan.device_memory_gb=0.1",
              "search.top_k=1", "search.max_probes=2", "search.steps=3", "search.warmup=1"]
    proc = run_bench(*search, module="bench.search", results_dir=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "search"
    runs = pd_csv(folder / "search.csv")
    top = runs[runs["kind"] == "top"].iloc[0]
    assert top["status"] == "ok" and top["predicted_step_ms"] > 0 and top["measured_step_ms"] > 0
    assert abs(top["peak_mb_error_pct"]) < 10, "the memory prediction holds for the run it picked"
    rows = read_rows(folder / "runs.jsonl")
    assert rows[0]["predicted_step_time_ms"] == pytest.approx(top["predicted_step_ms"], rel=1e-3), "in the row"
    probes = runs[runs["kind"] == "frontier"]
    assert len(probes) == 2 and set(probes["status"]) <= {"ok", "oom"}
    (frontier,) = pd_csv(folder / "frontier.csv").to_dict("records")
    if "oom" in set(probes["status"]):  # an oom row is kept, and bounds the frontier
        assert frontier["first_oom_batch_per_replica"] > frontier["measured_max_batch_per_replica"] > 0
    assert (folder / "prediction_error.png").is_file()
    again = run_bench(*search, module="bench.search", results_dir=tmp_path, timeout=300)
    assert again.returncode == 0 and "0 run(s) launched, the rest reused" in again.stdout
    assert len(read_rows(folder / "runs.jsonl")) == len(rows), "no finished run ran again"


def pd_csv(path):
    import pandas as pd

    return pd.read_csv(path)
