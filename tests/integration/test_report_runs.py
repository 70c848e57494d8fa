"""A real sweep: `python -m bench -m +experiment=smoke` (2 jobs, torchrun ranks on gloo), then the report."""

import csv
import json
import statistics

import pytest

from bench.report.cli import main
from conftest import read_rows, run_bench

PLOTS = ("throughput", "scaling_efficiency", "peak_memory", "step_time", "loss", "breakdown")


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_smoke_sweep_lands_in_one_file_and_the_report_plots_it(tmp_path, capsys):
    proc = run_bench("-m", "+experiment=smoke", results_dir=tmp_path, timeout=150)
    assert proc.returncode == 0, proc.stderr
    (sweep,) = (tmp_path / "sweeps").iterdir()
    rows = read_rows(sweep / "runs.jsonl")
    assert [(r["strategy"], r["world_size"], r["status"]) for r in rows] == [("ddp", 1, "ok"), ("ddp", 2, "ok")]
    one, two = rows

    assert main([str(sweep)]) == 0
    out = sweep / "report"
    for name in PLOTS:
        for suffix in (".png", ".svg", ".csv"):
            assert (out / f"{name}{suffix}").stat().st_size > 0, f"{name}{suffix}"
    assert str(out / "index.html") in capsys.readouterr().out

    # the plotted data are the rows' numbers
    throughput = read_csv(out / "throughput.csv")
    ddp = {int(float(p["devices"])): float(p["samples_per_s"]) for p in throughput if p["series"] == "ddp"}
    assert ddp == {1: pytest.approx(one["samples_per_s"]), 2: pytest.approx(two["samples_per_s"])}
    ideal = [float(p["samples_per_s"]) for p in throughput if p["series"].startswith("ideal")]
    assert ideal == pytest.approx([one["samples_per_s"], 2 * one["samples_per_s"]])

    efficiency = {
        int(float(p["devices"])): float(p["efficiency_pct"]) for p in read_csv(out / "scaling_efficiency.csv")
    }
    assert efficiency[2] == pytest.approx(100 * two["samples_per_s"] / (2 * one["samples_per_s"]))

    memory = {p["label"]: float(p["peak_mem_mb"]) for p in read_csv(out / "peak_memory.csv")}
    assert memory == {"ddp · 1 rank · G=16": one["peak_mem_mb"], "ddp · 2 ranks · G=16": two["peak_mem_mb"]}

    steps = read_csv(f"{two['run_dir']}/steps.csv")
    measured = [float(s["step_time_ms"]) for s in steps if s["measured"] == "1"]
    box = {p["label"]: p for p in read_csv(out / "step_time.csv")}["ddp · 2 ranks · G=16"]
    assert float(box["median_ms"]) == pytest.approx(statistics.median(measured))
    assert int(box["n_steps"]) == len(measured) == two["steps"] - two["warmup"]

    loss = [float(p["loss"]) for p in read_csv(out / "loss.csv") if p["label"] == "ddp · 2 ranks · G=16"]
    assert loss == pytest.approx([float(s["loss"]) for s in steps])

    summary = {int(r["world_size"]): r for r in read_csv(out / "summary.csv")}
    assert float(summary[2]["speedup"]) == pytest.approx(two["samples_per_s"] / one["samples_per_s"])
    config = json.loads((sweep / "0_ddp_mlp" / "config.json").read_text())
    assert config["steps"] == 6 and config["model"]["hidden"] == 256, "the experiment's values reached the run"
