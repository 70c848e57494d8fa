"""The training benchmark's controller: check and pin the config once, launch the ranks, record one row.

Runs inside the Hydra app (`python -m bench`, see `bench.app`); the ranks it starts (`bench.rank.worker`)
never import Hydra.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.app import JobResult, now
from bench.checks import config_warnings
from bench.data import prepare_data
from bench.errors import ConfigError
from bench.launch import LaunchOutcome, Worker, failure_status, launch
from bench.measure.breakdown import breakdown_table
from bench.measure.flops import step_flops
from bench.measure.rows import measured_fields, no_measurements, profile_fields, steps_table
from bench.models import model_label, model_spec
from bench.results import append_row, run_fields, write_csv_atomic, write_json_atomic
from bench.run import Run
from bench.run import prepare as resolve
from bench.runfolder import BREAKDOWN, ROW, STEPS, read_rank_results
from bench.summary import NOT_APPENDED, print_rows  # noqa: F401 (print_rows: bench.__main__ names it here)
from bench.verify import verify_parity

log = logging.getLogger("bench")

WORKER = Worker("bench.rank.worker", "train_rank")


@dataclass(frozen=True)
class Prepared:
    """A run resolved and checked before anything starts: the run, what its rank 0 is predicted to hold (MB by
    kind, `bench.plan.memory`; None where it was not predicted) and what the row should say about that."""

    run: Run
    predicted_memory_mb: dict | None = None
    warnings: tuple[str, ...] = ()


def prepare(cfg: dict) -> Prepared:
    """Resolve the config into a run (`bench.run.prepare`: checked, pinned, frozen), write its dataset once,
    then refuse it if its ranks are predicted not to fit here (unless `force=true`)."""
    run = resolve(cfg)
    prepare_data(run)  # once, here, before any rank reads it
    return Prepared(run) if run.config["force"] else check_memory(run)


def check_memory(run: Run) -> Prepared:
    """Refuse a run whose rank 0 is predicted (`bench.plan.memory`) to need more than a rank may hold on this
    machine; the prediction goes into the row beside what the run measured. Where its step could not be
    simulated, the check is against a floor (`bench.plan.bound.bound_mb`): refused where even that does not
    fit, else one warning, and nothing in the row's predicted peak (a floor is not a prediction). Where there is
    nothing to check, the row says why."""
    from bench.plan.memory import available_memory_mb, memory_refusal, predicted_memory_mb

    if not run.launcher.runs_here:
        return Prepared(run, warnings=(f"memory: not checked before the run: launch={run.launcher.name} does not "
                                       "start every rank on this machine",))
    # why: not simulated, the strategy's reason or what fake tensors could not run (with the bound: and its parts)
    predicted, why = predicted_memory_mb(run, fallback=True)
    if predicted is None:
        return Prepared(run, warnings=(f"memory: not checked before the run: {why}",))
    refusal = memory_refusal(predicted, *available_memory_mb(run))
    if refusal:
        raise ConfigError(refusal)
    if predicted["method"] == "bound":
        return Prepared(run, warnings=(f"memory: checked against a bound, not simulated: {why}",))
    return Prepared(run, predicted)


def empty_row(cfg, run_dir: Path, started_at: str, overrides: list[str], repeat: int = 0) -> dict:
    """A training run's row with nothing measured: its identity and config, the measured fields null."""
    row = run_fields(cfg, run_dir, started_at, overrides)
    row.update(
        strategy=cfg["strategy"]["name"],
        model=model_label(cfg["model"]),
        data=cfg["data"]["name"],
        global_batch=cfg["global_batch"],
        seq_len=model_spec(cfg["model"]).tokens_per_sample(cfg["model"]),
        cp=cfg["parallel"].get("cp", 1),
        ep=cfg["parallel"].get("ep", 1),
        steps=cfg["steps"],
        warmup=cfg["warmup"],
        repeat=repeat,
        repeats=cfg["repeats"],
        predicted_peak_mem_mb=None,
        predicted_step_time_ms=None,
    )
    return {**row, **no_measurements()}


def run_benchmark(prepared: Prepared, run_dir: Path, results_file: Path, overrides: list[str]) -> JobResult:
    """Run one configuration `repeats` times, each in fresh processes (`<run_dir>/repeat<i>/` when more than
    once), one row each, and say how it went. Stops at an interruption. No rows where another controller
    records them (the nodes of a multi-node run that do not hold global rank 0, inline ranks but 0)."""
    run, predicted = prepared.run, prepared.predicted_memory_mb
    rows, outcome, ok = [], None, True
    for repeat in range(run.config["repeats"]):
        folder = run_dir if run.config["repeats"] == 1 else run_dir / f"repeat{repeat}"
        received: list[int] = []  # signals noted, not raised, until the row is written whole (run_once raises them)
        with signals_handled(lambda signum, frame, noted=received: noted.append(signum)):
            row, outcome = run_once(run, folder, overrides, repeat)
            if row is None:
                return JobResult(None, outcome, ok=outcome.status == "ok")
            row["predicted_peak_mem_mb"] = predicted["total"] if predicted else None
            row["predicted_step_time_ms"] = run.config["predicted_step_time_ms"]
            row["warnings"] += list(prepared.warnings)
            ok &= record_row(row, folder, results_file) and row_ok(row, run.config)
        rows.append(row)
        if received and outcome.status != "interrupted":  # the row is whole and true; the run ends here
            name = signal.Signals(received[0]).name
            outcome = LaunchOutcome("interrupted", detail=f"controller received {name} while it wrote the row",
                                    signal=received[0])
        if outcome.status == "interrupted":
            break
    return JobResult(rows, outcome, ok=ok)


def row_ok(row: dict, cfg) -> bool:
    """The run measured, and where it was to be checked against one device, it was, and it matched."""
    return row["status"] == "ok" and (not cfg["verify"] or row["parity_ok"] is True)


def record_row(row: dict, run_dir: Path, results_file: Path) -> bool:
    """The row into `<run_dir>/row.json` (the run's own copy, for `bench.report --from-run-folders` where a
    shared results file cannot be trusted, e.g. flock across NFS clients), then appended to the results file.
    False, and the user told, when the row could not be appended whole."""
    copy: str | None = str(run_dir / ROW)
    try:
        write_json_atomic(run_dir / ROW, row)
    except OSError as exc:
        print(f"bench: warning: could not write {copy}: {exc}", file=sys.stderr)
        copy = None
    try:
        append_row(results_file, row)
    except Exception as exc:  # OSError: a full disk, a quota; TypeError/ValueError: a value JSON cannot hold
        print(f"bench: the row of {row['run_id']} could NOT be appended to {results_file}: {exc}", file=sys.stderr)
        row[NOT_APPENDED] = copy  # for the summary, which must not say it was appended
        return False
    return True


class Interrupted(KeyboardInterrupt):
    """The controller received SIGINT or SIGTERM outside a launch (which turns them into its outcome)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextmanager
def signals_handled(handler):
    """SIGINT and SIGTERM go to `handler` in the block (a launch inside installs its own, then puts these back)."""
    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def run_once(run: Run, run_dir: Path, overrides: list[str], repeat: int):
    """Launch the ranks once and build the row: (row, how the run ended); no row where another controller
    records it. A signal at any point gives an `interrupted` row: during the launch the launcher stops the ranks
    and says so; before it, or while the row is derived from the ranks' results, the row keeps what was derived."""
    start, started_at, row, outcome = time.perf_counter(), now(), None, None
    try:
        with signals_handled(raise_interrupted):
            row = new_row(run, run_dir, started_at, overrides, repeat)
            outcome = launch_once(run, run_dir)
            if not outcome.records_row:
                return None, outcome
            row["slurm_job_id"] = outcome.slurm_job_id or os.environ.get("SLURM_JOB_ID")
            row_from_results(run, run_dir, row, outcome)
            row.update(outcome.extra_fields)
    except KeyboardInterrupt as exc:  # Interrupted, verify's ReferenceInterrupted; a plain one is SIGINT's
        row = row or new_row(run, run_dir, started_at, overrides, repeat)
        outcome = interrupted(run, row, outcome, getattr(exc, "signum", None) or signal.SIGINT)
        if not outcome.records_row:
            return None, outcome
    row["duration_s"] = time.perf_counter() - start
    return row, outcome


def new_row(run: Run, run_dir: Path, started_at: str, overrides: list[str], repeat: int) -> dict:
    row = empty_row(run.config, run_dir, started_at, overrides, repeat)
    if run.config["repeats"] > 1:
        row["run_id"] = f"{run_dir.parent.name}/{run_dir.name}"
    row["warnings"] += config_warnings(run.config)
    return row


def launch_once(run: Run, run_dir: Path) -> LaunchOutcome:
    """Write the run's config into its folder and launch its ranks: how the launch ended."""
    try:
        run.save(run_dir)
    except OSError as exc:  # a full disk: a row that says so, not a traceback
        return LaunchOutcome("failed", detail=f"nothing started: the run's config could not be written: {exc}")
    return launch(run.config, run_dir, WORKER)


def interrupted(run: Run, row: dict, outcome: LaunchOutcome | None, signum: int) -> LaunchOutcome:
    """Mark `row` interrupted by `signum`, which reached the controller outside a launch's own signal handling:
    before the launch returned (`outcome` None: nothing was measured) or after, while the row was derived from
    the ranks' results (what was derived stands, the rest is null)."""
    name = signal.Signals(signum).name
    if outcome is None:
        error = f"controller received {name} before the launch ended: nothing measured"
        if run.launcher.shares_run_folder:  # only its launch tells such a controller whether the row is its own
            return LaunchOutcome("interrupted", detail=error, signal=signum, records_row=False, note=error)
    else:
        error = f"controller received {name} after the launch ({outcome.status}), while the row was derived from "
        error += "the ranks' results: fields not yet derived are null"
    row.update(status="interrupted", error=error)
    return LaunchOutcome("interrupted", detail=error, signal=signum, launch_id=outcome and outcome.launch_id)


def row_from_results(run: Run, run_dir: Path, row: dict, outcome: LaunchOutcome) -> None:
    """Fill `row` from the result files the launch's ranks handed in (only those stamped with its id): every
    rank's, or the row says how the launch failed."""
    world = run.world_size
    ranks = read_rank_results(run_dir, world, outcome.launch_id)
    if len(ranks) < world:
        missing = sorted(set(range(world)) - set(ranks))
        row["status"] = failure_status(outcome)
        row["failed_rank"] = outcome.first_failed_rank
        row["error"] = outcome.error or f"ranks {missing} exited without writing results"
        return
    derive_from_ranks(run, run_dir, row, [ranks[r] for r in range(world)])
    if outcome.status != "ok":
        # Every rank handed in its results before something went wrong in teardown: the numbers stand.
        row["warnings"].append(f"{outcome.status} after every rank had written its results: {outcome.error}")


# FLOP counts of a step that could not be counted: the FLOP fields null (`flops_fields`)
NO_FLOPS = {"model_flops_per_sample": None, "model_flops_causal_per_sample": None, "hardware_flops_per_sample": None,
            "flops_convention": None}


def derive_from_ranks(run: Run, run_dir: Path, row: dict, ranks: list[dict]) -> None:
    """Everything the controller derives from every rank's results (ordered by rank), one step at a time: a step
    that fails leaves its fields null, or its file unwritten, with why in the row's warnings; never the row lost
    (ENOSPC in writing breakdown.csv on a nearly full disk ended the controller after the ranks, with a Hydra
    traceback and no row)."""
    cfg, warnings = run.config, row["warnings"]
    flops = attempt(warnings, "flops: not counted, the FLOP fields are null", lambda: step_flops(run)) or NO_FLOPS
    measured = attempt(warnings, "measurements: not derived", lambda: measurements(run, ranks, flops))
    if measured is None:
        row.update(status="failed", error=f"every rank handed in its results, but {warnings[-1]}")
    else:
        warnings.extend(measured.pop("warnings", []))
        row.update(measured)
    attempt(warnings, f"{STEPS}: not written",
            lambda: write_csv_atomic(run_dir / STEPS, steps_table(cfg["warmup"], ranks)))
    if all(r.get("profile") for r in ranks):
        row.update(attempt(warnings, "profile: the breakdown fields are null", lambda: profile_fields(ranks)) or {})
        attempt(warnings, f"profile: {BREAKDOWN} not written",
                lambda: write_csv_atomic(run_dir / BREAKDOWN, breakdown_table(ranks)))
    if cfg["verify"]:
        row.update(attempt(warnings, "verify: not compared with one device",
                           lambda: verify_parity(run, run_dir, ranks, warnings, WORKER)) or {})


def attempt(warnings: list[str], what: str, step):
    """`step()`, or None with `what` and why appended to `warnings`. An interruption is not caught here."""
    try:
        return step()
    except Exception as exc:
        warnings.append(f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
        return None


def measurements(run: Run, ranks: list[dict], flops: dict) -> dict:
    """The measured fields but the profile's breakdown, which `derive_from_ranks` derives as a step of its own."""
    unprofiled = [{k: v for k, v in r.items() if k != "profile"} for r in ranks]
    return measured_fields(run.config, unprofiled, flops, run.model.tokens_per_sample(run.config["model"]))
