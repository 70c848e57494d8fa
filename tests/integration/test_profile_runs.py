"""profile=true on real gloo runs of single, ddp, fsdp (2 ranks) and tensor (2 ranks), profiled within the
multirun of tests/strategy_cases.py: their traces of a few steps after the timed ones read back, where each step's
time went. The arithmetic: tests/unit/test_profile.py."""

import gzip
import json
from pathlib import Path

import pytest

from bench.measure.breakdown import PARTS_MS
from strategy_cases import PROFILE_STEPS, PROFILED_CASES

# one worker runs this module's tests and shares its multirun (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("strategy_cases")


@pytest.fixture
def profiled(strategy_rows):
    """The profiled cases' rows (tests/strategy_cases.py: 4 timed steps, then PROFILE_STEPS profiled)."""
    return {name: strategy_rows[name] for name in PROFILED_CASES}


def read_trace(path):
    with gzip.open(path, "rt") as f:
        return json.load(f)


@pytest.mark.parametrize("name", PROFILED_CASES)
def test_every_rank_writes_a_trace_of_the_profiled_steps_after_the_timed_ones(profiled, name):
    row = profiled[name]
    assert row["status"] == "ok", row["error"]
    for rank in range(row["world_size"]):
        t = read_trace(f"{row['run_dir']}/traces/rank{rank}.json.gz")
        events = [e for e in t["traceEvents"] if e.get("ph") == "X"]
        steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
        assert len(steps) == PROFILE_STEPS
        timed_end_us = json.load(open(f"{row['run_dir']}/ranks/rank{rank}.json"))["timed_end_unix_s"] * 1e6
        first_us = t["baseTimeNanoseconds"] / 1e3 + min(e["ts"] for e in events)
        assert first_us > timed_end_us, "profiling starts after the timed steps ended"


@pytest.mark.parametrize("name", PROFILED_CASES)
def test_the_breakdown_sums_to_each_profiled_step(profiled, name):
    import pandas as pd

    row = profiled[name]
    table = pd.read_csv(f"{row['run_dir']}/breakdown.csv")
    assert len(table) == PROFILE_STEPS * row["world_size"] and set(PARTS_MS) <= set(table.columns)
    parts = table["compute_ms"] + table["comm_exposed_ms"] + table["data_wait_ms"] + table["idle_ms"]
    assert (parts - table["step_ms"]).abs().max() <= 0.01 * table["step_ms"].min()
    for rank, steps in table.groupby("rank"):
        t = read_trace(f"{row['run_dir']}/traces/rank{rank}.json.gz")
        traced = sorted(e["dur"] / 1e3 for e in t["traceEvents"] if e.get("name", "").startswith("ProfilerStep#"))
        assert sorted(steps["step_ms"]) == pytest.approx(traced, abs=1e-4), "a step is its ProfilerStep range"
    shares = row["compute_pct"] + row["comm_exposed_pct"] + row["profile_data_wait_pct"] + row["idle_pct"]
    assert shares == pytest.approx(100, abs=0.5)
    assert row["profile_steps"] == PROFILE_STEPS and row["profile_step_time_ms"] > 0


def test_communication_shows_where_the_strategy_communicates(profiled):
    rows = dict(profiled)
    single = rows.pop("single_mlp")
    assert single["comm_pct"] == 0 and single["overlap_pct"] is None and single["straggler_rank"] is None
    for name, row in rows.items():
        assert row["comm_pct"] > 1, name
        assert row["comm_exposed_pct"] <= min(row["comm_pct"] + 1e-9, row["comm_exposed_pct_max"]), name
        assert row["straggler_rank"] in (0, 1) and 0 < row["straggler_share_pct"] <= 100, name


def test_the_report_draws_where_the_time_goes(profiled):
    from bench.report.load import load_rows
    from bench.report.plots import time_breakdown_figure
    from bench.report.table import runs_frame, summarize

    sweep = Path(profiled["ddp_gpt"]["run_dir"]).parent
    rows, _ = load_rows([sweep])
    plot = time_breakdown_figure(summarize(runs_frame(rows)))
    data = plot.data
    labelled = sorted(label.split(" · ")[1] for label in data["label"])  # "<model> · <strategy> · ..."
    assert labelled == sorted(name.split("_")[0] for name in PROFILED_CASES)
    drawn = data.drop(columns=["label", "profile_step_time_ms", "overlap_pct"]).sum(axis=1)
    assert (drawn - data["profile_step_time_ms"]).abs().max() < 0.01 * data["profile_step_time_ms"].min()
    single = data[data["label"].str.contains(" · single · ")].iloc[0]
    assert single["comm_hidden_ms"] == 0 and single["comm_exposed_ms"] == 0
