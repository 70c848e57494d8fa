"""After the ranks, in-process: every rank's results handed in always give a row, whatever step of the controller
fails after them (each leaves its fields null, or its file unwritten, and says why); a signal at any moment gives an
`interrupted` row; a rank's unreadable error file is a failure recorded, not the controller's end; the summary says
where the row is, and where it is not. The ranks' results are fabricated, as `bench.rank.worker` writes them."""

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest

from bench import controller
from bench.launch import LaunchOutcome
from bench.launch.agent import run_ranks
from bench.results import read_rows
from bench.run import prepare
from conftest import compose_plain

LAUNCH_ID = "this launch"
FLOPS = {"model_flops_per_sample": 1e6, "hardware_flops_per_sample": 1.5e6, "flops_convention": "test"}


def rank_result(rank: int, profiled: bool) -> dict:
    """What a rank of a 2-rank run of 4 steps (1 warm-up) hands in, with round numbers."""
    kinds = dict.fromkeys(("params", "buffers", "grads", "optim", "activations", "temp", "other"), 1.0)
    result = {
        "rank": rank, "devices": 1, "step_time_s": [0.5, 0.1, 0.1, 0.1], "data_wait_s": [0.0] * 4,
        "loss": [2.0, 1.5, 1.2, 1.0], "device_name": "Test CPU", "matmul_precision": "fp32",
        "measured_peak_tflops": None, "backend": "gloo", "params": 1000, "num_threads": 1, "cores": 2,
        "host": "testhost", "peak_rss_mb": 500.0, "baseline_rss_mb": 300.0, "setup_peak_mb": 50.0,
        "tracked_memory_mb": {**kinds, "total": 7.0}, "strategy_facts": {}, "step_timer": "perf_counter",
        "torch_version": "x", "cuda_version": None, "nccl_version": None, "launch_id": LAUNCH_ID,
    }
    if profiled:
        parts = {"step_ms": 100.0, "compute_ms": 60.0, "comm_ms": 30.0, "comm_exposed_ms": 20.0, "overlap_ms": 10.0,
                 "data_wait_ms": 5.0, "idle_ms": 15.0}
        result["profile"] = {"steps": [parts], "collectives": [[["c10d::allreduce_", 1000.0 + rank]]]}
    return result


def a_run(tmp_path, *overrides):
    return prepare(compose_plain("strategy=ddp", "launch.nproc=2", "steps=4", "warmup=1", "force=true",
                                 f"results_dir={tmp_path}", *overrides))


def hand_in(run_dir, profiled=False) -> None:
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    for rank in range(2):
        (run_dir / "ranks" / f"rank{rank}.json").write_text(json.dumps(rank_result(rank, profiled)))


class NoSpaceLeft:
    """A file on a full disk: opened (created), but no write gets through."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def disk_full_for(monkeypatch, where: str) -> None:
    """Every file written through `Path.open` whose path holds `where` is on a full disk."""
    real_open = Path.open

    def open_(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return NoSpaceLeft(file) if where in str(path) and ("w" in mode or "a" in mode) else file

    monkeypatch.setattr(Path, "open", open_)


def fails(*args, **kwargs):
    raise RuntimeError("injected")


def ranks_that_hand_in(profiled: bool):
    """A launch whose ranks all hand in their results and end."""
    def launch(cfg, run_dir, worker):
        hand_in(run_dir, profiled)
        return LaunchOutcome("ok", launch_id=LAUNCH_ID)

    return launch


# (step, where it fails: a full disk in a file whose path holds `disk_full`, or what raises instead, overrides,
# the warning's start, the fields it leaves null)
FAILURES = [
    ("flops", {"replace": "bench.controller.step_flops"}, [],
     "flops: not counted, the FLOP fields are null: RuntimeError: injected",
     ["model_flops_per_step", "hardware_flops_per_step", "mfu_pct"]),
    ("steps.csv", {"disk_full": "steps.csv"}, [], "steps.csv: not written: OSError: [Errno 28]", []),
    ("breakdown.csv", {"disk_full": "breakdown.csv"}, ["profile.enabled=true"],
     "profile: breakdown.csv not written: OSError: [Errno 28]", []),
    ("breakdown fields", {"replace": "bench.measure.rows.breakdown_fields"}, ["profile.enabled=true"],
     "profile: the breakdown fields are null: RuntimeError: injected", ["compute_pct", "straggler_rank"]),
    ("verify", {"replace": "bench.controller.verify_parity"}, ["verify=true"],
     "verify: not compared with one device: RuntimeError: injected", ["parity_ok", "parity_max_rel_diff"]),
    # the reference's config written into its folder (`bench.runfolder.write_config`) on a full disk
    ("reference config", {"disk_full": ".parity-reference"}, ["verify=true"],
     "verify: not compared with one device: OSError: [Errno 28]", ["parity_ok", "parity_max_rel_diff"]),
]


@pytest.mark.parametrize("step,fault,overrides,warning,nulls", FAILURES, ids=[f[0] for f in FAILURES])
def test_a_step_after_the_ranks_that_fails_leaves_its_fields_null_and_the_row_is_recorded(
        tmp_path, monkeypatch, step, fault, overrides, warning, nulls):
    run = a_run(tmp_path, *overrides)
    monkeypatch.setattr(controller, "launch", ranks_that_hand_in(profiled="profile.enabled=true" in overrides))
    monkeypatch.setattr(controller, "step_flops", lambda run: FLOPS)  # counted on fake tensors: seconds
    if "replace" in fault:
        monkeypatch.setattr(fault["replace"], fails)
    else:
        disk_full_for(monkeypatch, fault["disk_full"])
    result = controller.run_benchmark(controller.Prepared(run), tmp_path / "run", tmp_path / "runs.jsonl", [])
    (row,), problems = read_rows(tmp_path / "runs.jsonl")
    assert problems == [] and row == json.loads(json.dumps(result.rows[0], default=str))
    assert row["status"] == "ok" and row["samples_per_s"] > 0, "the rest stands"
    assert [w for w in row["warnings"] if w.startswith(warning)], row["warnings"]
    assert all(row[field] is None for field in nulls)
    if "disk_full" in fault and step.endswith(".csv"):
        assert not (tmp_path / "run" / step).exists(), "no file cut off by the full disk is left to be read"
    if step == "flops":
        assert row["peak_mem_mb"] == 7.0 and row["loss_last"] is not None
    if step != "verify" and "verify=true" not in overrides:
        assert result.ok, "a warning, not a failure"


def test_measurements_that_cannot_be_derived_fail_the_row_but_never_lose_it(tmp_path, monkeypatch):
    run = a_run(tmp_path)
    monkeypatch.setattr(controller, "launch", ranks_that_hand_in(profiled=False))
    monkeypatch.setattr(controller, "step_flops", lambda run: FLOPS)
    monkeypatch.setattr(controller, "measured_fields", fails)
    result = controller.run_benchmark(controller.Prepared(run), tmp_path / "run", tmp_path / "runs.jsonl", [])
    (row,), _ = read_rows(tmp_path / "runs.jsonl")
    assert row["status"] == "failed" and row["samples_per_s"] is None and not result.ok
    assert row["error"] == "every rank handed in its results, but measurements: not derived: RuntimeError: injected"
    assert (tmp_path / "run" / "steps.csv").is_file(), "the other steps still ran"


def test_a_config_that_cannot_be_written_before_the_launch_is_a_failed_row(tmp_path, monkeypatch):
    run = a_run(tmp_path)
    launched = []
    monkeypatch.setattr(controller, "launch", lambda *args: launched.append(args))
    disk_full_for(monkeypatch, "config.json")  # `bench.runfolder.write_config`
    result = controller.run_benchmark(controller.Prepared(run), tmp_path / "run", tmp_path / "runs.jsonl", [])
    (row,), _ = read_rows(tmp_path / "runs.jsonl")
    assert launched == [] and row["status"] == "failed" and not result.ok
    assert row["error"] == "nothing started: the run's config could not be written: [Errno 28] No space left on device"


def test_a_summary_that_cannot_be_printed_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("bench.summary.print_summary", fails)
    monkeypatch.setattr(controller, "print_summary", fails, raising=False)
    controller.print_rows([{"samples_per_s": 1.0, "run_id": "r"}], tmp_path / "runs.jsonl")
    assert capsys.readouterr().err == "bench: warning: the summary could not be printed: RuntimeError: injected\n"


def test_the_summary_never_says_a_row_was_appended_that_was_not(tmp_path, capsys):
    run = a_run(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    row = controller.empty_row(run.config, run_dir, "now", [])
    row.update(status="failed", error="boom")
    results_file = tmp_path / "runs.jsonl"
    results_file.mkdir()  # a folder: the append fails, as on a full disk
    assert not controller.record_row(row, run_dir, results_file)
    controller.print_rows([row], results_file)
    out = " ".join(capsys.readouterr().out.split())
    assert f"row NOT appended to: {results_file}" in out and "row appended to" not in out
    assert f"its only copy: {run_dir / 'row.json'}" in out
    assert json.loads((run_dir / "row.json").read_text())["error"] == "boom"


# --------------------------------------------------------------------------- interruptions


class Escaped(Exception):
    """A signal that reached the test's own handler: it escaped the code under test."""


@pytest.fixture
def signals_escape():
    """SIGINT and SIGTERM raise `Escaped` unless the code under test handles them (SIGTERM's default would end
    pytest)."""
    def escape(signum, frame):
        raise Escaped(signal.Signals(signum).name)

    saved = {sig: signal.signal(sig, escape) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def signalled(sig):
    os.kill(os.getpid(), sig)
    time.sleep(5)  # the handler runs here, at once
    raise AssertionError("the signal was not delivered")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_rendezvous_is_an_interrupted_launch(tmp_path, monkeypatch, signals_escape, sig):
    """Before torch's agent starts the ranks it has no signal handler of its own: what the rendezvous sees."""
    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch",
                        lambda config, entrypoint: lambda *args: signalled(sig))
    outcome = run_ranks(None, controller.WORKER, tmp_path, compose_plain("launch.nproc=2"))
    assert (outcome.status, outcome.signal) == ("interrupted", sig)
    assert outcome.error == f"controller received {sig.name}: before any rank started"
    assert signal.getsignal(sig).__name__ == "escape", "the controller's handlers are back"


def reference_interrupted(cfg, run_dir, worker):
    """The reference's launch as `bench.launch.agent` ends it when the controller gets SIGTERM."""
    return LaunchOutcome("interrupted", detail="controller received SIGTERM: ranks stopped", signal=signal.SIGTERM)


INTERRUPTED = [  # (when, what is replaced, by what, overrides, the signal)
    ("while the FLOPs are counted", "bench.controller.step_flops", lambda run: signalled(signal.SIGINT), [],
     signal.SIGINT),
    ("while the reference runs", "bench.verify.launch", reference_interrupted, ["verify=true"], signal.SIGTERM),
]


@pytest.mark.parametrize("when,name,replacement,overrides,sig", INTERRUPTED, ids=[i[0] for i in INTERRUPTED])
def test_a_signal_after_the_ranks_is_an_interrupted_row(tmp_path, monkeypatch, signals_escape, when, name,
                                                        replacement, overrides, sig):
    run = a_run(tmp_path, *overrides)
    monkeypatch.setattr(controller, "launch", ranks_that_hand_in(profiled=False))
    monkeypatch.setattr(controller, "step_flops", lambda run: FLOPS)
    monkeypatch.setattr(name, replacement)
    result = controller.run_benchmark(controller.Prepared(run), tmp_path / "run", tmp_path / "runs.jsonl", [])
    (row,), _ = read_rows(tmp_path / "runs.jsonl")
    assert (result.outcome.status, result.outcome.signal, result.ok) == ("interrupted", sig, False)
    assert row["status"] == "interrupted" and row["error"].startswith(f"controller received {sig.name} after the "
                                                                      "launch (ok), while the row was derived")
    if "reference" in when:
        assert row["samples_per_s"] > 0 and row["parity_ok"] is None, "what was derived stands, the rest is null"
    else:
        assert row["samples_per_s"] is None


def test_a_signal_before_the_launch_is_an_interrupted_row(tmp_path, monkeypatch, signals_escape):
    run = a_run(tmp_path)
    monkeypatch.setattr(controller, "launch", lambda cfg, run_dir, worker: signalled(signal.SIGTERM))
    result = controller.run_benchmark(controller.Prepared(run), tmp_path / "run", tmp_path / "runs.jsonl", [])
    (row,), _ = read_rows(tmp_path / "runs.jsonl")
    assert (result.outcome.status, result.outcome.signal) == ("interrupted", signal.SIGTERM)
    assert row["status"] == "interrupted"
    assert row["error"] == "controller received SIGTERM before the launch ended: nothing measured"


def test_a_signal_while_the_row_is_written_ends_the_run_after_it(tmp_path, monkeypatch, signals_escape):
    run = a_run(tmp_path)
    monkeypatch.setattr(controller, "launch", ranks_that_hand_in(profiled=False))
    monkeypatch.setattr(controller, "step_flops", lambda run: FLOPS)
    append = controller.append_row

    def append_when_signalled(path, row):
        os.kill(os.getpid(), signal.SIGTERM)
        append(path, row)

    monkeypatch.setattr(controller, "append_row", append_when_signalled)
    result = controller.run_benchmark(controller.Prepared(run), tmp_path / "run", tmp_path / "runs.jsonl", [])
    (row,), _ = read_rows(tmp_path / "runs.jsonl")
    assert row["status"] == "ok" and row["samples_per_s"] > 0, "the row is whole, and true: the run had ended"
    assert (result.outcome.status, result.outcome.signal) == ("interrupted", signal.SIGTERM)
    assert result.outcome.error == "controller received SIGTERM while it wrote the row"


# --------------------------------------------------------------------------- a rank's error file


def failing_rank(error_file: str):
    """torch's agent seeing rank 1 exit with code 1: it reads the rank's error file there and then."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def run(*args):
        raise ChildFailedError("bench", {1: ProcessFailure(local_rank=1, pid=4242, exitcode=1, error_file=error_file)})

    return lambda config, entrypoint: run


WHOLE = json.dumps({"message": {"message": "RuntimeError: boom", "extraInfo": {"py_callstack": "", "timestamp": "1"}}})
ERROR_FILES = [
    ("empty", "", "exited with code 1; its error file {} could not be read (JSONDecodeError: Expecting value"),
    ("cut off", WHOLE[:30], "exited with code 1; its error file {} could not be read (JSONDecodeError: "),
    ("no message", "{}", "exited with code 1; its error file {} could not be read (KeyError: 'message')"),
    ("whole", WHOLE, "RuntimeError: boom"),
]


@pytest.mark.parametrize("content,expected", [e[1:] for e in ERROR_FILES], ids=[e[0] for e in ERROR_FILES])
def test_a_rank_whose_error_file_cannot_be_read_is_recorded_as_failed(tmp_path, monkeypatch, content, expected):
    error_file = tmp_path / "error.json"
    error_file.write_text(content)
    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", failing_rank(str(error_file)))
    outcome = run_ranks(None, controller.WORKER, tmp_path, compose_plain("launch.nproc=2"))
    assert outcome.status == "failed" and outcome.first_failed_rank == 1
    assert outcome.failed_ranks[1].startswith(expected.format(error_file))
