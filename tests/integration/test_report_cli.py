"""`python -m bench.report` on fabricated runs.jsonl files (tests/fabricated.py) as a user runs it, and its
command writing every table, figure and page."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report.cli import main
from conftest import REPO
from fabricated import scaling_sweep_in, two_sides


@pytest.fixture
def scaling_sweep(tmp_path) -> Path:
    return scaling_sweep_in(tmp_path)


def test_the_verdict_and_the_figure_data_do_not_need_matplotlib():
    plotting = ("matplotlib", "bench.report.plots", "bench.report.draw")
    code = (
        "import sys, bench.report.compare, bench.report.figure_data; "
        f"print(sorted(m for m in sys.modules if m.startswith({plotting!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# --- regression verdict ------------------------------------------------------------------------------


def test_python_dash_m_bench_report_gates_on_regression(tmp_path):
    base, cand = two_sides(tmp_path, [100, 102, 98], [80, 81, 79])
    proc = subprocess.run(
        [sys.executable, "-m", "bench.report", str(cand), "--baseline", str(base), "--no-plots"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "regression" in proc.stdout and "REGRESSION in 1 configuration" in proc.stdout


# --- named experiments ----------------------------------------------------------------------------------


def test_report_command_writes_tables_plots_and_page(scaling_sweep, capsys):
    assert main([str(scaling_sweep)]) == 0
    out = scaling_sweep / "report"
    names = ("throughput", "scaling_efficiency", "peak_memory", "step_time", "loss", "breakdown")
    for name in names:
        for suffix in (".png", ".svg", ".csv"):
            assert (out / f"{name}{suffix}").stat().st_size > 0, name + suffix
    page = (out / "index.html").read_text()
    assert all(f"{name}.svg" in page for name in names) and "<table>" in page
    md = (out / "summary.md").read_text()
    # 160, 170, 180: mean 170, s = 10, 95 % CI 170 ± t(0.975, 2)·10/√3 = 170 ± 4.303·5.774 = 170 ± 24.8
    assert "| ok 3/4, failed 1 |" in md and "170.0 [145.2, 194.8] (n=3)" in md and "| skipped |" in md
    assert "rank 3: exited with code 3" in md
    with (out / "summary.csv").open() as f:
        table = {(r["strategy"], r["world_size"], r["global_batch"]): r for r in csv.DictReader(f)}
    assert float(table[("ddp", "2", "64")]["efficiency_strong"]) == pytest.approx(0.85)
    assert table[("ddp", "4", "64")]["samples_per_s"] == ""
    printed = capsys.readouterr().out
    assert str(out / "index.html") in printed and str(out / "throughput.png") in printed


def test_comparison_plot_shows_ratio_and_highlights_regressions(tmp_path):
    base, cand = two_sides(tmp_path, [100, 102, 98], [90, 91, 89])
    assert main([str(cand), "--baseline", str(base)]) == 1
    data = list(csv.DictReader((cand / "report" / "comparison.csv").open()))
    assert float(data[0]["ratio"]) == pytest.approx(0.9) and data[0]["verdict"] == "regression"
    assert "comparison.svg" in (cand / "report" / "index.html").read_text()
