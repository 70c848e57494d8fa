"""Real runs: `python -m bench` in a fresh process, real torchrun ranks on gloo, real files."""

import csv
import json
import subprocess
import sys

import pytest
from conftest import REPO, read_rows, run_bench

pytestmark = pytest.mark.slow

CONTRACT_FIELDS = (
    "run_id started_at status error strategy model params world_size nnodes nproc global_batch steps warmup "
    "device backend device_name samples_per_s tokens_per_s step_time_ms_mean step_time_ms_p50 step_time_ms_p90 "
    "step_time_ms_p99 step_time_ms_std first_step_ms peak_mem_mb tflops_per_device mfu_pct loss_first loss_last "
    "torch_version python_version host git_sha duration_s run_dir"
).split()


def read_steps(row: dict) -> list[dict]:
    with open(f"{row['run_dir']}/steps.csv") as f:
        return list(csv.DictReader(f))


def test_default_run_records_one_complete_row(bench):
    proc, rows = bench()
    assert proc.returncode == 0, proc.stderr
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "ok" and row["error"] is None
    assert set(CONTRACT_FIELDS) <= set(row)
    assert (row["strategy"], row["model"], row["world_size"], row["device"]) == ("single", "mlp", 1, "cpu")
    assert row["peak_mem_reserved_mb"] is None, "no CUDA figure may be reported off a GPU"
    assert row["tokens_per_s"] is None and row["mfu_pct"] is None and row["warnings"]
    assert row["peak_mem_mb"] > row["peak_rss_above_baseline_mb"] > 0
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


def test_ddp_two_ranks_trains_the_same_model_as_single(bench):
    common = ("steps=6", "warmup=1", "global_batch=32")
    proc, _ = bench("strategy=single", *common)
    assert proc.returncode == 0, proc.stderr
    proc, rows = bench("strategy=ddp", "launch.nproc=2", *common)
    assert proc.returncode == 0, proc.stderr
    single, ddp = rows
    assert (ddp["status"], ddp["world_size"], ddp["backend"], ddp["omp_num_threads"]) == ("ok", 2, "gloo", 1)

    single_loss = [float(s["loss"]) for s in read_steps(single)]
    ddp_steps = read_steps(ddp)
    ddp_loss = [float(s["loss"]) for s in ddp_steps]
    assert ddp_loss == pytest.approx(single_loss, rel=1e-5), "same global batch, same weights, same losses"
    for s in ddp_steps:  # the step time is the slowest rank's
        per_rank = [float(s["step_time_ms_rank0"]), float(s["step_time_ms_rank1"])]
        assert float(s["step_time_ms"]) == pytest.approx(max(per_rank), abs=1e-3)
    assert (REPO / ddp["run_dir"] / "logs" / "rank1.log").is_file()


def test_gpt_reports_tokens_and_flops(bench):
    proc, rows = bench("model=gpt", "strategy=ddp", "launch.nproc=2", "steps=6", "warmup=2", "global_batch=8")
    assert proc.returncode == 0, proc.stderr
    row = rows[0]
    seq_len = row["config"]["model"]["seq_len"]
    assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * seq_len)
    assert row["tokens_per_s_per_device"] == pytest.approx(row["tokens_per_s"] / 2)
    expected_tflops = row["flops_per_step"] / (row["step_time_ms_mean"] / 1e3) / 2 / 1e12
    assert row["tflops_per_device"] == pytest.approx(expected_tflops)
    assert row["mfu_pct"] is None
    proc, rows = bench("model=gpt", "steps=3", "warmup=1", "global_batch=8", "peak_tflops=2.0")
    assert rows[-1]["mfu_pct"] == pytest.approx(100 * rows[-1]["tflops_per_device"] / 2.0)


def test_help_lists_config_groups():
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    for line in (
        "strategy: dataparallel, ddp, fsdp, pipeline, single, tensor, zero",
        "model: cnn, gpt, gpt-125m, gpt-350m, mlp",
        "launch: inline, local, multinode, slurm",
        "data: files, synthetic",
    ):
        assert line in proc.stdout


def test_multirun_appends_every_job_to_the_sweep_file(tmp_path):
    proc = run_bench("-m", "model=mlp,gpt", "steps=3", "warmup=1", "global_batch=8", results_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (sweep,) = (tmp_path / "sweeps").iterdir()
    rows = read_rows(sweep / "runs.jsonl")
    assert [(r["model"], r["status"]) for r in rows] == [("mlp", "ok"), ("gpt", "ok")]
    assert all(r["run_dir"].startswith(str(sweep)) for r in rows)


def test_installed_wheel_finds_its_configs(tmp_path):
    """A wheel install (not the checkout) runs from any folder: conf/ ships inside the package."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    (wheel,) = wheels.glob("bench-*.whl")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_bench("steps=3", "warmup=1", results_dir=elsewhere / "results", cwd=elsewhere, python=python)
    assert proc.returncode == 0, proc.stderr
    (row,) = read_rows(elsewhere / "results" / "runs.jsonl")
    assert row["status"] == "ok"
    location = subprocess.run(
        [python, "-c", "import bench; print(bench.__file__)"], capture_output=True, text=True, cwd=elsewhere
    ).stdout
    assert str(venv) in location, "the test must exercise the wheel, not the checkout"
