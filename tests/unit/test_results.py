"""The results files, in-process: rows read back whole or skipped with their line, only this launch's rank files
read, a cut-off line never swallowing the next row, a parity reference reused only when it reads back whole.
Concurrent writers and a full disk: tests/integration/test_reliability.py."""

import json

from bench import results, runfolder


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
