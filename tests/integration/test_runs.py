"""`python -m bench` as a new user runs it: the default benchmark, repeats with a measured peak, its help. From an
installed wheel: test_install.py."""

import csv
import json
import subprocess
import sys

import pytest

from bench import group_options
from bench.measure.stats import confidence_interval_95
from bench.report.cli import main as report_main
from conftest import REPO

CONTRACT_FIELDS = (
    "run_id started_at status error strategy model params world_size nnodes nproc global_batch seq_len cp steps warmup "
    "device backend device_name samples_per_s tokens_per_s step_time_ms_mean step_time_ms_p50 step_time_ms_p90 "
    "step_time_ms_p99 step_time_ms_std first_step_ms peak_mem_mb model_flops_per_step hardware_flops_per_step "
    "flops_convention tflops_per_device mfu_pct hfu_pct peak_tflops peak_source loss_first loss_last "
    "torch_version python_version host git_sha duration_s run_dir repeat repeats"
).split()


def read_steps(row: dict) -> list[dict]:
    with open(f"{row['run_dir']}/steps.csv") as f:
        return list(csv.DictReader(f))


def test_default_run_records_one_complete_row(bench):
    proc, rows = bench("force=false")  # the quick start's run, its memory predicted before it starts
    assert proc.returncode == 0, proc.stderr
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "ok" and row["error"] is None
    assert set(CONTRACT_FIELDS) <= set(row)
    assert (row["strategy"], row["model"], row["world_size"], row["device"]) == ("single", "mlp", 1, "cpu")
    assert row["cuda_peak_allocated_mb"] is None, "no CUDA figure may be reported off a GPU"
    assert row["tokens_per_s"] is None and row["mfu_pct"] is None and "peak_tflops=measure" in row["warnings"][0]
    assert row["step_timer"] == "perf_counter"
    # what the rank holds at the peak of its tracked step: the MLP's weights, gradients and momentum
    params_mb = row["params"] * 4 / 2**20
    assert row["mem_params_mb"] == pytest.approx(params_mb, rel=0.01)
    assert row["mem_optim_mb"] == pytest.approx(params_mb, rel=0.01)
    kinds = ("params", "buffers", "grads", "optim", "activations", "temp", "other")
    assert sum(row[f"mem_{k}_mb"] for k in kinds) == pytest.approx(row["peak_mem_mb"])
    assert row["predicted_peak_mem_mb"] == pytest.approx(row["peak_mem_mb"], rel=0.1), "bench.plan.memory"
    assert row["peak_rss_mb"] > row["peak_rss_above_baseline_mb"] > 0, "the process RSS, a secondary figure"
    assert "samples/s" in proc.stdout and "runs.jsonl" in proc.stdout

    steps = read_steps(row)
    assert len(steps) == row["steps"]
    measured = [float(s["step_time_ms"]) for s in steps if s["measured"] == "1"]
    assert len(measured) == row["steps"] - row["warmup"]
    # the row's numbers are the statistics of the recorded steps, warm-up excluded
    assert row["step_time_ms_mean"] == pytest.approx(sum(measured) / len(measured), rel=1e-3)
    assert row["samples_per_s"] == pytest.approx(row["global_batch"] * 1e3 / row["step_time_ms_mean"], rel=1e-3)
    assert row["first_step_ms"] == pytest.approx(float(steps[0]["step_time_ms"]), rel=1e-3)
    assert row["loss_first"] == pytest.approx(float(steps[0]["loss"]), rel=1e-5)

    run_dir = REPO / row["run_dir"]
    for name in ("config.yaml", "config.json", "logs/rank0.log", "ranks/rank0.json", "bench.log"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["device"] == "cpu", "the resolved config is saved"


def test_repeats_and_a_measured_peak_give_an_interval_and_an_mfu_on_cpu(bench, tmp_path, capsys):
    proc, rows = bench("repeats=2", "peak_tflops=measure", "steps=4", "warmup=1")
    assert proc.returncode == 0, proc.stderr
    assert [r["repeat"] for r in rows] == [0, 1] and {r["repeats"] for r in rows} == {2}
    assert len({r["run_dir"] for r in rows}) == 2, "each repeat in fresh processes and a folder of its own"
    for row in rows:
        assert row["peak_source"] == "measured" and row["peak_tflops"] > 0
        assert 0 < row["mfu_pct"] == pytest.approx(100 * row["tflops_per_device"] / row["peak_tflops"])
    assert len({r["peak_tflops"] for r in rows}) == 1, "measured once, then read from the cache"
    rates = [r["samples_per_s"] for r in rows]
    low, high = confidence_interval_95(rates)
    assert f"95% CI [{low:,.1f}, {high:,.1f}] (Student t, n=2)" in proc.stdout

    assert report_main([str(tmp_path), "--no-plots"]) == 0
    (line,) = list(csv.DictReader(open(tmp_path / "report" / "summary.csv")))
    assert int(line["ok_runs"]) == 2, "the report takes the repeats as one configuration"
    assert float(line["samples_per_s_ci95_low"]) == pytest.approx(low)
    assert float(line["samples_per_s_ci95_high"]) == pytest.approx(high)


def test_help_lists_every_option_of_every_group():
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    for group in ("strategy", "model", "data", "launch"):
        assert f"{group}: {', '.join(group_options(group))}" in proc.stdout
