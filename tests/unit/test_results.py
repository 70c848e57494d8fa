"""The results files, in-process: rows read back whole or skipped with their line, only this launch's rank files
read, a cut-off line never swallowing the next row, a full disk refused before a run and never leaving a file cut
off, a parity reference reused only when it reads back whole and built once for runs verified together.
Concurrent writers and a full disk at the end of a run: tests/integration/test_reliability.py."""

import json
import os
import resource
import signal
import threading
import time
from contextlib import contextmanager

from bench import results, runfolder
from conftest import compose_plain


def test_corrupt_lines_are_reported_with_their_number_and_skipped(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(
        json.dumps({"run_id": "a"}) + "\n" + '{"run_id": "b", "sta' + "\n[1, 2]\n" + json.dumps({"run_id": "c"}) + "\n"
    )
    rows, problems = results.read_rows(path)
    assert [r["run_id"] for r in rows] == ["a", "c"]
    assert len(problems) == 2 and ":2: skipped" in problems[0] and ":3: skipped" in problems[1]


def test_only_this_launchs_result_files_are_read(tmp_path):
    (tmp_path / "ranks").mkdir()
    for rank, launch_id in ((0, "this"), (1, "an earlier run")):
        (tmp_path / "ranks" / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "launch_id": launch_id}))
    assert list(runfolder.read_rank_results(tmp_path, 2, "this")) == [0]


def test_a_line_cut_off_earlier_never_swallows_the_next_row(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps({"run_id": "a"}) + "\n" + '{"run_id": "cut off mid-wri')
    results.append_row(path, {"run_id": "b"})
    rows, problems = results.read_rows(path)
    assert [r["run_id"] for r in rows] == ["a", "b"]
    assert len(problems) == 1 and ":2: skipped" in problems[0]


def test_a_parity_reference_that_does_not_read_back_whole_is_run_again(tmp_path):
    """The cache is used only when its marker, its rank file from the same launch and its parameters all read
    back; otherwise `run_reference` runs the reference again instead of crashing after training."""
    import torch

    from bench.verify import cached_reference

    torch.save({"w": torch.ones(2)}, tmp_path / "params.pt")
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "rank0.json").write_text(json.dumps({"rank": 0, "launch_id": "L", "loss": [1.0]}))
    (tmp_path / "reference.json").write_text(json.dumps({"launch_id": "L"}))
    assert cached_reference(tmp_path)["loss"] == [1.0]
    (tmp_path / "reference.json").write_text(json.dumps({"launch_id": "another launch"}))
    assert cached_reference(tmp_path) is None
    (tmp_path / "reference.json").write_text(json.dumps({"launch_id": "L"}))
    params = tmp_path / "params.pt"
    params.write_bytes(params.read_bytes()[:100])  # cut off, as by a full disk or a killed writer
    assert cached_reference(tmp_path) is None


@contextmanager
def files_of_at_most(size: int):
    """No file this process writes may grow past `size` bytes (EFBIG, SIGXFSZ ignored): a full disk, in-process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_full_disk_is_a_folder_bench_cannot_write(tmp_path):
    """An empty file needs no data block: on a full disk (a full tmpfs) it is still created, and a check that
    wrote none passed there. The check writes more than a row takes."""
    with files_of_at_most(1000):
        problem = results.folder_problem(str(tmp_path))
    assert problem is not None and "File too large" in problem
    assert list(tmp_path.iterdir()) == [], "the check's file is removed"
    assert results.folder_problem(str(tmp_path)) is None


def test_a_csv_the_disk_cannot_take_whole_is_not_left_cut_off(tmp_path):
    path = tmp_path / "steps.csv"
    with files_of_at_most(1000):
        try:
            results.write_csv_atomic(path, [["step", "step_time_ms"], *([i, 1.0] for i in range(500))])
        except OSError:
            pass
    assert list(tmp_path.iterdir()) == [], "no steps.csv that a report would read as the run's steps"


def test_runs_verified_together_build_their_reference_once_and_share_it(tmp_path, monkeypatch):
    """Two controllers started together with verify=true in one results folder (threads here: each holds its own
    lock file open, as a process would). Without the lock both launched the reference into its one folder, the
    second's launch cleared the first's rank file as stale, and a run failed with "reference run failed"."""
    import torch

    from bench.controller import WORKER
    from bench.run import prepare
    from bench.verify import run_reference

    run = prepare(compose_plain("strategy=ddp", "launch.nproc=2", "steps=4", "warmup=1", "force=true", "verify=true",
                                f"results_dir={tmp_path}"))
    launches = []

    def reference_rank(cfg, run_dir, worker):
        """The local launcher's one rank: it inherits the launch id when it starts, trains, hands in its results,
        and its process takes a while to end."""
        from bench.launch import LaunchOutcome

        launch_id = os.environ[runfolder.LAUNCH_ID_ENV]
        launches.append(launch_id)
        time.sleep(0.5)
        results.write_json_atomic(run_dir / "ranks" / "rank0.json", {"rank": 0, "loss": [1.0], "launch_id": launch_id})
        torch.save({"w": torch.ones(2)}, run_dir / "params.pt")
        time.sleep(0.5)
        return LaunchOutcome("ok")

    monkeypatch.setattr("bench.launch.local.launch", reference_rank)
    got: dict[int, object] = {}

    def verify(i: int) -> None:
        try:
            got[i] = run_reference(run, WORKER)[0]
        except Exception as exc:
            got[i] = exc

    threads = [threading.Thread(target=verify, args=(i,)) for i in range(2)]
    threads[0].start()
    time.sleep(0.7)  # the second starts while the first's reference rank is ending, its results handed in
    threads[1].start()
    for t in threads:
        t.join(timeout=60)
    assert got[0] == got[1] == {"rank": 0, "loss": [1.0], "launch_id": launches[0]}, got
    assert len(launches) == 1, "one reference for both runs"
