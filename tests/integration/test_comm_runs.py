"""The collectives benchmark run as a user runs it: 2 ranks on gloo measure every collective, and a failing run
records a failed row. Its arithmetic: tests/unit/test_comm.py."""

import json

import pytest

from bench.comm.collectives import COLLECTIVES
from bench.measure.bandwidth import busbw_factor
from conftest import run_bench


def run_comm(tmp_path, *overrides, timeout=300):
    return run_bench(*overrides, results_dir=tmp_path, module="bench.comm", timeout=timeout)


def test_two_ranks_on_gloo_measure_every_collective(tmp_path):
    proc = run_comm(tmp_path, "launch.nproc=2", "comm.max_bytes=16384", "comm.iters=3", "comm.warmup_iters=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "comm.jsonl").read_text().splitlines()]
    sizes = [1024, 2048, 4096, 8192, 16384]
    assert sorted((r["collective"], r["size_bytes"]) for r in rows) == sorted(
        (c, s) for c in COLLECTIVES for s in sizes
    )
    for r in rows:
        assert (r["status"], r["kind"], r["backend"], r["world_size"], r["checked"]) == ("ok", "comm", "gloo", 2, True)
        assert r["count"] * 4 == r["size_bytes"]
        assert r["time_us"] >= r["time_us_min_rank"] > 0, "the max over ranks"
        assert r["algbw_gbps"] == pytest.approx(r["size_bytes"] / (r["time_us"] / 1e6) / 1e9)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * busbw_factor(r["collective"], 2))
    assert {r["busbw_factor"] for r in rows} == {1.0, 0.5}  # n=2: all_reduce, broadcast 1; the others 1/2
    run_dir = rows[0]["run_dir"]
    assert all(r["run_dir"] == run_dir for r in rows), "one run, one row per collective x size"
    for collective in COLLECTIVES:
        assert (tmp_path / run_dir / f"busbw_{collective}.png").stat().st_size > 0
    assert len((tmp_path / run_dir / "comm.csv").read_text().splitlines()) == 1 + len(rows)
    assert "busbw GB/s" in proc.stdout


def test_a_failing_comm_run_records_a_failed_row(tmp_path):
    proc = run_comm(tmp_path, "launch.nproc=2", "comm.dtype=float16", "comm.max_bytes=2048", "timeout_s=0.001")
    assert proc.returncode == 1
    (row,) = [json.loads(line) for line in (tmp_path / "comm.jsonl").read_text().splitlines()]
    assert row["status"] == "timeout" and row["collective"] is None and row["busbw_gbps"] is None
