"""Against a real SLURM (tests/slurm/start.sh, which .ci/run starts): launch=slurm through submitit, the
sbatch template, srun with launch=inline. Skipped, with the reason, where SLURM is not running."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.controller import empty_row
from conftest import REPO, compose_plain, read_rows, run_bench, sweep_rows


def slurm_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM is not installed here (no `sinfo`)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "SLURM is not answering (`sinfo` timed out)"
    if proc.returncode != 0:
        return f"SLURM is not running (`sinfo` failed: {proc.stderr.strip()[:200]})"
    if not any(state.strip().rstrip("*") in ("idle", "mixed", "allocated") for state in proc.stdout.split()):
        return f"no usable SLURM node (`sinfo` says {proc.stdout.split()})"
    return None


PROBLEM = slurm_problem()
pytestmark = [
    pytest.mark.xdist_group("slurm"),  # one worker: the cluster's one node runs one job at a time
    pytest.mark.skipif(PROBLEM is not None, reason=f"{PROBLEM}; start one with tests/slurm/start.sh (root)"),
]

# launch.poll_s=1: ask sacct every second, so that a job that died without a result is seen at once
SLURM = ("launch=slurm", "launch.nproc=2", "launch.poll_s=1", "strategy=ddp", "global_batch=16", "warmup=1")


def sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip()


def queued(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=30)
    return bool(out.stdout.strip())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One sweep of two jobs, each its own SLURM job: a 2-rank DDP run, then one whose rank 1 raises."""
    results = tmp_path_factory.mktemp("slurm-sweep")
    proc = run_bench("-m", *SLURM, "steps=5", "fault=choice({rank:null},{rank:1,step:2})", results_dir=results,
                     timeout=400)
    return proc, sweep_rows(results)


def test_two_rank_ddp_job_lands_a_row_like_a_local_run(sweep):
    proc, (row, _) = sweep
    assert (row["status"], row["launcher"], row["world_size"], row["backend"]) == ("ok", "slurm", 2, "gloo")
    assert row["slurm_job_id"] and row["slurm_job_id"].isdigit()
    assert sacct_state(row["slurm_job_id"]) == "COMPLETED" and not queued(row["slurm_job_id"])
    assert f"submitted SLURM job {row['slurm_job_id']}" in proc.stderr
    assert "rank 0/2" in proc.stderr, "rank 0's log is streamed while the job runs"
    run_dir = Path(row["run_dir"])
    assert {p.name for p in (run_dir / "ranks").iterdir()} == {"rank0.json", "rank1.json"}
    assert len((run_dir / "steps.csv").read_text().splitlines()) == 1 + 5
    assert set(row) == set(empty_row(compose_plain("strategy=ddp"), run_dir, "", [])), "a local run's fields"


def test_a_rank_that_raises_gives_a_failed_row_with_the_job_id(sweep):
    proc, (ok, row) = sweep
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert row["status"] == "failed" and row["failed_rank"] == 1
    assert "rank 1: RuntimeError: injected fault on rank 1 at step 2" in row["error"]
    assert row["slurm_job_id"] and sacct_state(row["slurm_job_id"]).startswith(("FAILED", "CANCELLED"))
    assert row["duration_s"] < 120 and not queued(row["slurm_job_id"])
    assert row["slurm_job_id"] != ok["slurm_job_id"], "one SLURM job per sweep job"


def test_benchs_timeout_cancels_the_job_and_gives_a_timeout_row(bench):
    proc, rows = bench(*SLURM, "steps=500", "fault.rank=1", "fault.step=1", "fault.kind=hang", "timeout_s=3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    (row,) = rows
    assert row["status"] == "timeout" and "no end after timeout_s=3" in row["error"]
    assert sacct_state(row["slurm_job_id"]).startswith("CANCELLED") and not queued(row["slurm_job_id"])


@pytest.mark.long
def test_slurms_time_limit_gives_a_timeout_row(bench):
    """SLURM ends the job at its time limit (1 minute, SLURM's smallest): bench reports `timeout`, not a hang."""
    proc, rows = bench(
        *SLURM, "steps=500", "fault.rank=1", "fault.step=1", "fault.kind=hang", "launch.time_min=1", timeout=400
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    (row,) = rows
    assert row["status"] == "timeout" and "reached its time limit (launch.time_min=1)" in row["error"]
    assert sacct_state(row["slurm_job_id"]) == "TIMEOUT"


def wait_for_job(job_id: str, timeout: float = 300) -> str:
    """The job's final state: once it has left the queue and accounting no longer says it runs (squeue can
    drop a job a moment before sacct records how it ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = sacct_state(job_id)
        if not queued(job_id) and state and not state.startswith(("PENDING", "RUNNING", "COMPLETING")):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"SLURM job {job_id} still queued after {timeout} s: cancelled")


def test_the_sbatch_template_runs_one_rank_per_task(tmp_path):
    """launch/slurm.sbatch as a user submits it, its GPU and size lines overridden for this CPU cluster."""
    sbatch = [
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=5",
        f"--output={tmp_path}/slurm-%j.out",
        str(REPO / "launch" / "slurm.sbatch"),
        f"results_dir={tmp_path}",
        "progress=false",
        "strategy=ddp",
        "steps=4",
        "warmup=1",
        "global_batch=16",
    ]
    env = {**os.environ, "PYTHON": sys.executable}
    submitted = subprocess.run(sbatch, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    state = wait_for_job(job_id)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    (row,) = read_rows(tmp_path / "runs.jsonl")
    assert (row["status"], row["launcher"], row["world_size"], row["slurm_job_id"]) == ("ok", "inline", 2, job_id)
    assert Path(row["run_dir"]).name == f"{job_id}.0_ddp_mlp", "one run folder for the job's ranks"


def test_comm_benchmark_through_slurm(tmp_path):
    args = [
        sys.executable,
        "-m",
        "bench.comm",
        f"results_dir={tmp_path}",
        "launch=slurm",
        "launch.nproc=2",
        "launch.poll_s=1",
        "comm.max_bytes=4096",
        "comm.iters=2",
        "comm.warmup_iters=1",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "comm.jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "ok" and r["slurm_job_id"] == rows[0]["slurm_job_id"] for r in rows)
    assert {r["collective"] for r in rows} == {"all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"}


def test_interrupting_the_controller_cancels_the_job(tmp_path):
    args = [sys.executable, "-m", "bench", f"results_dir={tmp_path}", "progress=false", *SLURM, "steps=100000"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("logs/rank1.log")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # the ranks are training now
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()  # never leave a controller (and its job) behind, whatever happened
    assert proc.returncode == 130, err[-3000:]
    (row,) = read_rows(tmp_path / "runs.jsonl")
    assert row["status"] == "interrupted" and "SIGINT" in row["error"]
    assert sacct_state(row["slurm_job_id"]).startswith("CANCELLED") and not queued(row["slurm_job_id"])
