"""The planner's and the report's inputs as a hand edit, an older bench or another writer may leave them: rows of
the wrong type, NaN, inf, negative numbers, missing keys, JSON that is not an object. Each such row is skipped with
one warning naming its file and line (never a crash, never dropped without a word) and the command goes on with
the good rows. First the cases found by hand, then hypothesis over generated files (tests/fuzzing.py's style:
derandomized, no database, a few seconds)."""

import contextlib
import io
import json
import math
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.configs import thaw
from bench.plan import network, throughput
from bench.plan import rows as plan_rows
from bench.plan.calibration import strategy_runs
from bench.plan.network import Network, NotMeasured, fit
from bench.plan.throughput import measured_runs, measured_throughput
from bench.report.load import ReportError, load_rows, load_run_folder_rows
from bench.report.scaling import add_scaling
from bench.report.table import runs_frame, summarize
from bench.run import prepare
from conftest import compose_plain

DEVICE = "the device"
FITTED = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")  # what bench.comm times
SIZES = [2**k for k in range(10, 23)]  # bench.comm's sizes on CPU: 1 KiB to 4 MiB
PLAN = ["model=mlp", "global_batch=16", "plan.world_sizes=[2]", "plan.strategies=[ddp]",
        "plan.activation_checkpointing=[false]"]


def links_of_h100s_devices_of_this_machine() -> list[str]:
    """A preset's links with this machine's device (a preset's node brings its GPU, whose runs are not here)."""
    from bench.rank.runtime import device_name

    return ["plan.network=h100-nvlink-ib400", f"plan.device_name='{device_name('cpu')}'", "plan.device_memory_gb=8"]


def stderr_of(read) -> tuple[object, list[str]]:
    """(what `read()` returns, the warning lines it printed): the planner warns on stderr, once per process
    (`bench.plan.rows.warn_once`), so what earlier tests warned is forgotten first."""
    plan_rows.WARNED.clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        value = read()
    return value, err.getvalue().splitlines()


def single_row(run, device_name: str = DEVICE, **changes) -> dict:
    """A strategy=single row as `python -m bench` writes it, with the fields the planner and the report read."""
    return {"status": "ok", "device_name": device_name, "config": thaw(run.config), "strategy": "single",
            "model": "mlp", "world_size": 1, "nproc": 1, "nnodes": 1, "global_batch": run.config["global_batch"],
            "omp_num_threads": throughput.machine_cores(), "hardware_flops_per_step": 1e9, "step_time_ms_p50": 100.0,
            "samples_per_s": 160.0, "peak_mem_mb": 50.0, "host": "h", "run_id": "r", "device": "cpu", **changes}


def comm_row(collective: str = "all_reduce", size: int = 1024, world: int = 2, **changes) -> dict:
    """A bench.comm row: 50 us + the bus bytes at 2 GB/s (2e3 bytes per us)."""
    return {"status": "ok", "device_name": DEVICE, "backend": "gloo", "collective": collective, "world_size": world,
            "nnodes": 1, "size_bytes": size, "time_us": 50 + size / 2e3, **changes}


def write_lines(path: Path, lines: list) -> None:
    """One line per item: text as it is, anything else as JSON (NaN and Infinity as Python's json writes them)."""
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines))


# ------------------------------------------------------------------------------ run rows: the cases by hand


def test_a_run_row_with_a_string_batch_is_skipped_and_the_plan_reads_the_others(tmp_path):
    """`"global_batch": "64"` crashed `bench.plan` (TypeError in `measured_throughput`): skipped with one line,
    the plan goes on with the good row's throughput."""
    from bench.plan.__main__ import main
    from bench.rank.runtime import device_name

    run = prepare(compose_plain("model=mlp", "global_batch=16", f"results_dir={tmp_path}", "force=true"))
    write_lines(tmp_path / "runs.jsonl", [single_row(run, device_name("cpu"), global_batch="64"),
                                          single_row(run, device_name("cpu"))])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code, warnings = stderr_of(lambda: main([*PLAN, *links_of_h100s_devices_of_this_machine(),
                                                 f"results_dir={tmp_path}"]))
    assert code == 0
    assert warnings == [f"warning: {tmp_path / 'runs.jsonl'}:1: skipped, global_batch is '64', expected a whole "
                        "number from 1 to 2**53, or null"]
    assert "throughput: measured: strategy=single, global_batch=16 (1 run(s))" in out.getvalue()


def test_the_search_reads_past_a_run_row_with_a_string_batch(tmp_path):
    """The same row crashed `bench.search` (TypeError): now it says there is nothing measured to rank by, after
    the one warning."""
    from bench.rank.runtime import device_name
    from bench.search.__main__ import main

    run = prepare(compose_plain("model=mlp", "global_batch=16", f"results_dir={tmp_path}", "force=true"))
    write_lines(tmp_path / "runs.jsonl", [single_row(run, device_name("cpu"), global_batch="64")])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code, warnings = stderr_of(lambda: main([*PLAN, *links_of_h100s_devices_of_this_machine(),
                                                 f"results_dir={tmp_path}"]))
    assert code == 1 and "nothing to run" in out.getvalue()
    assert warnings == [f"warning: {tmp_path / 'runs.jsonl'}:1: skipped, global_batch is '64', expected a whole "
                        "number from 1 to 2**53, or null"]


def test_a_row_whose_config_makes_no_run_is_not_used_for_calibration(tmp_path):
    """A measured row's config is built into a run to predict it (`StepTimeModel.predicted_runs`): one edited by
    hand to 4 ranks of a 2x1x1 layout raised TopologyError out of the plan; it calibrates nothing, said once."""
    from bench.plan.calibration import StepTimeModel
    from bench.plan.setup import prepare_plan

    planning = prepare_plan(["model=mlp", "global_batch=16", "plan.network=h100-nvlink-ib400",
                             f"results_dir={tmp_path}"])
    model = StepTimeModel(planning.base, planning.plan, planning.network, planning.device_name, None)
    ddp = prepare(compose_plain("model=mlp", "strategy=ddp", "launch.nproc=2", "global_batch=16",
                                f"results_dir={tmp_path}", "force=true"))
    edited = changed(thaw(ddp.config), "launch.nproc", 4)
    write_lines(tmp_path / "runs.jsonl", [{"status": "ok", "device_name": planning.device_name, "config": edited,
                                           "model": "mlp", "world_size": 4, "global_batch": 16,
                                           "step_time_ms_p50": 100.0}])
    calibration, warnings = stderr_of(lambda: model.overhead(ddp))
    assert calibration == (1.0, 0.0, "")
    assert warnings == [f"warning: {tmp_path / 'runs.jsonl'}:1: not used for calibration, its config does not make a "
                        "run (TopologyError: parallel: expected dp*cp*tp*pp == world size "
                        "(launch.nnodes*launch.nproc = 4), got 2*1*1*1 = 2. Change parallel.dp/cp/tp/pp (or set one to "
                        "-1 to infer it) or launch.nproc)"]


def test_the_check_reads_runs_whose_peak_was_not_measured(tmp_path):
    """`bench.plan.check` took the median of every row's peak_mem_mb: a null one (a peak not measured) beside a
    number raised TypeError, and a layout with none printed by `format(None, ".1f")`."""
    from types import SimpleNamespace

    import pandas as pd

    from bench.plan.check import markdown, measured

    run = prepare(compose_plain("model=mlp", "global_batch=16", f"results_dir={tmp_path}", "force=true"))
    write_lines(tmp_path / "runs.jsonl", [single_row(run, peak_mem_mb=None), single_row(run)])
    line = SimpleNamespace(run=run)
    assert measured(line, DEVICE) == {"runs": 2, "measured_step_ms": 100.0, "measured_peak_mb": 50.0}
    write_lines(tmp_path / "runs.jsonl", [single_row(run, peak_mem_mb=None)])
    got = measured(line, DEVICE)
    assert got["measured_peak_mb"] is None
    table = pd.DataFrame([{"model": "mlp", "strategy": "single", "world_size": 1, "layout": "1x1x1", **got,
                           "predicted_step_ms": 90.0, "step_error_pct": -10.0, "calibrated_step_ms": None,
                           "calibrated_error_pct": float("nan"), "calibrated_by": "-", "predicted_peak_mb": 40.0,
                           "memory_error_pct": float("nan")}])
    assert "| 100.0 | 90.0 | -10% | – | – | - | – | 40.0 | – |" in markdown(table)


# ------------------------------------------------------------------------------ comm rows: the cases by hand


def test_bad_comm_rows_are_skipped_with_file_and_line_and_the_good_ones_fitted(tmp_path):
    """A row without `collective` refused the plan as "invalid config: 'collective'", a NaN time as "SVD did not
    converge", neither naming a file: each bad row is skipped with its file and line, the fit made of the rest."""
    path = tmp_path / "comm.jsonl"
    bad = [{k: v for k, v in comm_row().items() if k != "collective"}, comm_row(time_us=math.nan),
           comm_row(size_bytes=math.inf), comm_row(time_us=-3.0), comm_row(world_size="2"),
           comm_row(collective="gossip"), comm_row(status=None), [1], "{cut off"]
    write_lines(path, [comm_row(size=size) for size in SIZES] + bad)
    net, warnings = stderr_of(lambda: network.measured(tmp_path, DEVICE, "gloo", None))
    link = net.intra["all_reduce"][2]
    assert link.latency_us == pytest.approx(50, rel=1e-6) and link.busbw_gbps == pytest.approx(2, rel=1e-6)
    n = len(SIZES)
    assert warnings == [
        f"warning: {path}:{n + 8}: skipped, not a JSON object",
        f"warning: {path}:{n + 9}: skipped, not valid JSON (Expecting property name enclosed in double quotes)",
        f"warning: {path}:{n + 1}: skipped, no collective, expected text",
        f"warning: {path}:{n + 2}: skipped, time_us is nan, expected a finite number > 0",
        f"warning: {path}:{n + 3}: skipped, size_bytes is inf, expected a finite number > 0",
        f"warning: {path}:{n + 4}: skipped, time_us is -3.0, expected a finite number > 0",
        f"warning: {path}:{n + 5}: skipped, world_size is '2', expected a whole number >= 2",
        f"warning: {path}:{n + 6}: skipped, collective is 'gossip', expected one of {', '.join(FITTED)}",
        f"warning: {path}:{n + 7}: skipped, status is None, expected text"]


def test_one_nan_comm_row_no_longer_refuses_the_plan(tmp_path):
    """`python -m bench.plan plan.network=measured` exited 2 on one NaN time ("SVD did not converge in Linear
    Least Squares"): it plans, priced by the good rows, after one warning."""
    from bench.plan.__main__ import main
    from bench.rank.runtime import device_name

    rows = [comm_row(c, size, device_name=device_name("cpu")) for c in FITTED[:4] for size in SIZES]
    write_lines(tmp_path / "comm.jsonl", [*rows, {**rows[0], "time_us": math.nan}])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code, warnings = stderr_of(lambda: main([*PLAN, "plan.network=measured", "plan.device_tflops=1",
                                                 f"results_dir={tmp_path}"]))
    assert code == 0 and "network: measured (bench.comm on" in " ".join(out.getvalue().split())
    assert warnings == [f"warning: {tmp_path / 'comm.jsonl'}:{len(rows) + 1}: skipped, time_us is nan, expected "
                        "a finite number > 0"]


def test_a_network_is_not_fitted_from_one_size_nor_from_negative_times(tmp_path):
    """One message size fitted a step 113x the one 13 sizes fit (the least-squares minimum-norm answer: two
    unknowns, one point), negative times a negative bandwidth (a step of -9.5 ms): a collective measured at one
    size is not fitted, said in one line naming the file; with nothing left to fit, the network is refused in one
    line naming the file (the plan prices no step time, `bench.search` refuses to start)."""
    path = tmp_path / "comm.jsonl"
    write_lines(path, [comm_row(c, 1024) for c in FITTED[:4]])
    with pytest.raises(NotMeasured) as refused:
        stderr_of(lambda: network.measured(tmp_path, DEVICE, "gloo", None))
    assert str(refused.value).count("\n") == 0 and str(path) in str(refused.value)
    _, warnings = stderr_of(lambda: pytest.raises(NotMeasured, network.measured, tmp_path, DEVICE, "gloo", None))
    assert warnings[0] == (f"warning: {path}: all_gather over 2 ranks not fitted: 1 message size measured, a "
                           "latency and a bandwidth need 2 or more (bench.comm times each power of two from "
                           "comm.min_bytes to comm.max_bytes)") and len(warnings) == 4

    write_lines(path, [comm_row(size=size, time_us=-(50 + size / 2e3)) for size in SIZES])
    with pytest.raises(NotMeasured, match="got none"):
        stderr_of(lambda: network.measured(tmp_path, DEVICE, "gloo", None))

    write_lines(path, [comm_row("all_reduce", 1024)] + [comm_row("all_gather", size) for size in SIZES])
    net, warnings = stderr_of(lambda: network.measured(tmp_path, DEVICE, "gloo", None))
    assert set(net.intra) == {"all_gather", "*"} and len(warnings) == 1, "the one size not fitted, the others are"
    assert net.call_s("all_reduce", 2, 1, 1e6) > 0, "priced by the collective that was fitted"


# ------------------------------------------------------------------------------ generated files

MISSING = object()  # a key taken out of the row
WRONG = st.sampled_from(["64", "", ["ok"], {}, None, math.nan, math.inf, -math.inf, -1, 0, 1.5, True, 10**30,
                         MISSING])
RUN_KEYS = ("status", "config", "global_batch", "world_size", "nproc", "step_time_ms_p50", "hardware_flops_per_step",
            "omp_num_threads", "samples_per_s", "model", "strategy", "device_name", "peak_mem_mb", "run_dir", "host",
            "parity_ok", "loss_last", "devices", "config.strategy", "config.strategy.name", "config.parallel",
            "config.parallel.tp", "config.launch.nproc", "config.launch.omp_num_threads", "config.model",
            "config.device", "config.global_batch", "config.model.name")
COMM_KEYS = ("status", "device_name", "backend", "collective", "world_size", "nnodes", "size_bytes", "time_us")
NOT_ROWS = st.sampled_from(["[1, 2]", "null", "42", '"text"', "{cut off", "NaN", "[]"])


def changed(row: dict, key: str, value) -> dict:
    """`row` with its dotted `key` set to `value` (taken out where `value` is MISSING); as it was where a section
    on the way is not an object."""
    row = json.loads(json.dumps(row))
    *sections, last = key.split(".")
    node = row
    for section in sections:
        node = node.get(section) if isinstance(node, dict) else None
    if isinstance(node, dict):
        if value is MISSING:
            node.pop(last, None)
        else:
            node[last] = value
    return row


@st.composite
def lines_of(draw, good: list[dict], keys: tuple[str, ...]) -> list:
    """A file's lines: good rows, rows with one or two keys wrong, JSON that is not an object, text that is not
    JSON; each object marked with its line number (`_line`) so that a test can tell which line became which row."""
    out = []
    for number in range(1, draw(st.integers(1, 8)) + 1):
        kind = draw(st.sampled_from(["good", "wrong", "wrong", "not a row"]))
        if kind == "not a row":
            out.append(draw(NOT_ROWS))
            continue
        row = draw(st.sampled_from(good))
        for _ in range(draw(st.integers(1, 2)) if kind == "wrong" else 0):
            row = changed(row, draw(st.sampled_from(keys)), draw(WRONG))
        out.append({**row, "_line": number})
    return out


def read_or_warned(rows: list[dict], warned: list[str], path: Path, lines: list) -> None:
    """Every line of `path` became a row or was skipped with one warning naming it, never both, never neither."""
    skipped = [int(m.group(1)) for w in warned if (m := re.search(rf"{re.escape(str(path))}:(\d+): skipped, ", w))]
    kept = [row["_line"] for row in rows]
    assert sorted(kept + skipped) == list(range(1, len(lines) + 1)), (kept, warned)
    assert all("\n" not in w for w in warned)


FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
RUN = prepare(compose_plain("model=mlp", "global_batch=16", "force=true"))
GOOD_RUNS = [single_row(RUN), single_row(RUN, global_batch=32, step_time_ms_p50=150.0),
             single_row(RUN, status="failed", step_time_ms_p50=None, error="rank 0: boom")]


@FUZZ
@given(lines_of(GOOD_RUNS, RUN_KEYS))
def test_the_planner_reads_any_runs_file_row_by_row(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "runs.jsonl"
        write_lines(path, lines)
        measured, _ = stderr_of(lambda: measured_throughput(folder, RUN, DEVICE))
        assert measured is None or (math.isfinite(measured["tflops"]) and measured["tflops"] > 0)
        stderr_of(lambda: measured_runs(folder, RUN.config, DEVICE, ()))
        for same_shape in (True, False):
            stderr_of(lambda: strategy_runs(folder, RUN, DEVICE, same_shape))  # noqa: B023 - called at once
        rows, warned = stderr_of(lambda: plan_rows.planner_rows(path, plan_rows.planner_row_problem))
        read_or_warned(rows, warned, path, lines)
        assert all(row["_where"] == f"{path}:{row['_line']}" for row in rows)


@FUZZ
@given(lines_of(GOOD_RUNS, RUN_KEYS))
def test_the_report_reads_any_runs_file_row_by_row(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "runs.jsonl"
        write_lines(path, lines)
        try:
            rows, warned = load_rows([path])
        except ReportError as exc:  # its one documented refusal: nothing in the file is a row
            assert str(exc) == f"no runs in {path}"
            rows, warned = [], load_rows_warnings(path)
        read_or_warned(rows, warned, path, lines)
        if rows:
            add_scaling(summarize(runs_frame(rows)))


def load_rows_warnings(path: Path) -> list[str]:
    """The warnings of a file none of whose lines is a row (load_rows refuses it before returning them)."""
    from bench.results import checked_rows, run_row_problem

    return checked_rows(path, run_row_problem)[1]


@FUZZ
@given(lines_of(GOOD_RUNS, RUN_KEYS), st.booleans())
def test_the_report_reads_any_run_folders_row_by_row(lines, one_without_row):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for number, line in enumerate(lines, start=1):
            (root / f"run{number}").mkdir()
            write_lines(root / f"run{number}" / "row.json", [line])
        if one_without_row:
            (root / "running").mkdir()
            (root / "running" / "config.json").write_text("{}")
        try:
            rows, warned = load_run_folder_rows([root])
        except ReportError as exc:
            assert str(exc) == f"no row.json under {root}"
            rows, warned = [], None
        if warned is not None:
            kept = sorted(row["_line"] for row in rows)
            skipped = sorted(int(m.group(1)) for w in warned if (m := re.search(r"/run(\d+)/row.json: skipped", w)))
            assert sorted(kept + skipped) == list(range(1, len(lines) + 1)), (kept, warned)
            assert any(w.startswith(f"{root / 'running'}: skipped") for w in warned) == one_without_row


GOOD_COMM = [comm_row(c, size) for c in ("all_reduce", "all_gather") for size in SIZES[:4]] + [
    comm_row("broadcast", 1024, world=4), comm_row(status="skipped", collective="all_to_all")]


@FUZZ
@given(lines_of(GOOD_COMM, COMM_KEYS))
def test_the_network_reads_any_comm_file_row_by_row_and_never_prices_a_negative_time(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "comm.jsonl"
        write_lines(path, lines)
        try:
            net, _ = stderr_of(lambda: network.measured(folder, DEVICE, "gloo", None))
            assert_prices_time(net)
        except NotMeasured as exc:  # its one documented refusal, in one line naming the file
            assert "\n" not in str(exc) and str(path) in str(exc)
        rows, warned = stderr_of(lambda: plan_rows.planner_rows(path, network.comm_row_problem))
        read_or_warned(rows, warned, path, lines)


def assert_prices_time(net: Network) -> None:
    for links in (net.intra, net.inter):
        for link in (link for by_ranks in links.values() for link in by_ranks.values()):
            assert link.latency_us >= 0 and math.isfinite(link.latency_us)
            assert link.busbw_gbps > 0 and math.isfinite(link.busbw_gbps)
    for collective in (*FITTED, "p2p"):
        for ranks, size in ((2, 0.0), (4, 1.0), (16, 1e12)):
            seconds = net.call_s(collective, ranks, 3, size)
            # never negative nor NaN (NaN >= 0 is false); a fit of absurd times (1e295 us) may price inf
            assert seconds >= 0, (collective, ranks, size, seconds)


POSITIVE = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False)


@FUZZ
@given(st.lists(st.tuples(POSITIVE, POSITIVE), min_size=2, max_size=8).filter(lambda p: len({x for x, _ in p}) > 1))
def test_a_fit_of_positive_points_is_a_latency_and_a_bandwidth_or_none(points):
    link = fit(points)
    if link is not None:
        assert_prices_time(Network("fuzz", "fit", 8, intra={"*": {2: link}}))
