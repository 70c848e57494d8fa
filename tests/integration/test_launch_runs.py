"""Launch modes beyond one machine, for real: multinode (two "nodes" on localhost forming one job), inline (under
torchrun), and launch=slurm through submitit's local cluster (no SLURM
needed; a real one: test_slurm.py)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_rows, run_bench

# --------------------------------------------------------------------------- real runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


COMMON = ("progress=false", "strategy=ddp", "steps=5", "warmup=1", "global_batch=16", "launch.omp_num_threads=1")


def start_node(results_dir: Path, port: int, rdzv_id: str, *overrides: str) -> subprocess.Popen:
    """One "node": launch/multinode.sh, as a cluster user runs it on each machine."""
    env = {**os.environ, "NNODES": "2", "NPROC": "1", "RDZV_HOST": "localhost", "RDZV_PORT": str(port)}
    env.update(RDZV_ID=rdzv_id, PYTHON=sys.executable, HYDRA_FULL_ERROR="1")
    args = [str(REPO / "launch" / "multinode.sh"), f"results_dir={results_dir}", *COMMON, *overrides]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process, once all have ended."""
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outputs, strict=True)]


@pytest.mark.parametrize("filesystem", ["separate", "shared"])
def test_two_nodes_on_localhost_form_one_job_and_record_one_row(tmp_path, filesystem):
    """Two controllers (two "nodes", 1 rank each) meet at a c10d rendezvous: one world of 2 ranks, one row,
    written by the node holding global rank 0 (with separate results folders: no shared filesystem)."""
    dirs = [tmp_path / "node_a", tmp_path / "node_b"] if filesystem == "separate" else [tmp_path] * 2
    port = free_port()
    ended = finish([start_node(d, port, "job-1") for d in dirs])
    for code, _, err in ended:
        assert code == 0, err[-3000:]
    notes = [err for _, _, err in ended if "the row is recorded by the node holding global rank 0" in err]
    assert len(notes) == 1, "exactly one node records nothing and says so"

    files = sorted({d / "runs.jsonl" for d in dirs if (d / "runs.jsonl").exists()})
    assert len(files) == 1
    (row,) = read_rows(files[0])
    assert (row["status"], row["launcher"], row["world_size"], row["nnodes"], row["nproc"]) == (
        "ok",
        "multinode",
        2,
        2,
        1,
    )
    run_dir = Path(row["run_dir"])
    assert run_dir.name == "job-1_ddp_mlp", "the run folder is named after the rendezvous id on every node"
    assert {p.name for p in (run_dir / "ranks").iterdir()} == {"rank0.json", "rank1.json"}
    for d in dirs:  # every node keeps its own ranks' logs in a folder of the same name
        assert list((d / "multinode" / "job-1_ddp_mlp" / "logs").glob("rank*.log"))

    if filesystem == "shared":
        assert {p.name for p in (run_dir / "logs").iterdir()} == {"rank0.log", "rank1.log"}
        return
    # the same global batch over one world of 2 ranks trains exactly as one process does
    proc = run_bench("progress=false", "steps=5", "warmup=1", "global_batch=16", results_dir=tmp_path / "single")
    assert proc.returncode == 0, proc.stderr
    (single,) = read_rows(tmp_path / "single" / "runs.jsonl")
    assert row["loss_first"] == pytest.approx(single["loss_first"], rel=1e-5)
    assert row["loss_last"] == pytest.approx(single["loss_last"], rel=1e-5)


def test_a_rank_failing_on_one_node_fails_the_job_on_both(tmp_path):
    dirs = [tmp_path / "node_a", tmp_path / "node_b"]
    port = free_port()
    ended = finish([start_node(d, port, "job-2", "steps=200", "fault.rank=1", "fault.step=2") for d in dirs])
    assert [code for code, _, _ in ended] == [1, 1]
    rows = [r for d in dirs if (d / "runs.jsonl").exists() for r in read_rows(d / "runs.jsonl")]
    (row,) = rows
    assert row["status"] == "failed" and row["samples_per_s"] is None
    # rank 1 is on the other node: the row-writing node sees rank 0 lose its peer, and says where to look
    assert row["failed_rank"] == 0 and "a rank on another node may have failed first" in row["error"]
    other_node_logs = [d / "multinode" / "job-2_ddp_mlp" / "logs" / "rank1.log" for d in dirs]
    assert any("injected fault on rank 1" in p.read_text() for p in other_node_logs if p.exists())
    assert row["duration_s"] < 120


def test_a_node_whose_partners_never_come_records_a_failed_row(tmp_path):
    proc = start_node(tmp_path, free_port(), "job-3", "launch.rdzv_timeout_s=3")
    ((code, _, err),) = finish([proc])
    assert code == 1, err[-3000:]
    (row,) = read_rows(tmp_path / "runs.jsonl")
    assert row["status"] == "failed" and "rendezvous failed" in row["error"]


def torchrun_inline(launcher: list[str], results_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    args = [sys.executable, "-m", *launcher, "-m", "bench", "launch=inline", f"results_dir={results_dir}", *overrides]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


INLINE_LAUNCHERS = {
    "torchrun": ["torch.distributed.run", "--standalone", "--nproc-per-node=2"],
    # the legacy torch.distributed.launch passes --local-rank=N: tests/unit/test_launch.py (no ranks started)
}


@pytest.mark.parametrize("launcher", INLINE_LAUNCHERS, ids=list(INLINE_LAUNCHERS))
def test_inline_ranks_under_torchrun_share_one_run_folder_and_rank0_records_the_row(tmp_path, launcher):
    proc = torchrun_inline(INLINE_LAUNCHERS[launcher], tmp_path, *COMMON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = read_rows(tmp_path / "runs.jsonl")
    assert (row["status"], row["launcher"], row["world_size"], row["nproc"], row["backend"]) == (
        "ok",
        "inline",
        2,
        2,
        "gloo",
    )
    (run_dir,) = (tmp_path / "inline").iterdir()
    assert Path(row["run_dir"]) == run_dir, "one run folder for both ranks, not one Hydra folder per rank"
    assert {p.name for p in (run_dir / "logs").iterdir()} == {"rank0.log", "rank1.log"}
    assert {p.name for p in (run_dir / "ranks").iterdir()} == {"rank0.json", "rank1.json"}


def test_inline_failure_is_recorded_by_rank0(tmp_path):
    proc = torchrun_inline(INLINE_LAUNCHERS["torchrun"], tmp_path, *COMMON, "steps=100", "fault.rank=0")
    assert proc.returncode != 0
    (row,) = read_rows(tmp_path / "runs.jsonl")
    assert row["status"] == "failed" and "rank 0: RuntimeError: injected fault on rank 0" in row["error"]


def test_slurm_launcher_through_submitits_local_cluster(bench):
    """launch=slurm's whole path (submit, wait, stream rank 0's log, outcome) with submitit's local executor."""
    proc, rows = bench("launch=slurm", "launch.cluster=local", "launch.nproc=2", "launch.poll_s=1", *COMMON[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = rows
    assert (row["status"], row["launcher"], row["world_size"], row["slurm_job_id"]) == ("ok", "slurm", 2, None)
    assert "[slurm " in proc.stderr and "rank 0/2" in proc.stderr, "rank 0's log is streamed while the job runs"


def test_slurm_launcher_without_slurm_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on PATH
    env = {**os.environ}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", f"results_dir={tmp_path}", "launch=slurm"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "launch: expected a machine that can submit SLURM jobs" in proc.stderr
    assert not (tmp_path / "runs.jsonl").exists()
