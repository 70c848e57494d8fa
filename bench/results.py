"""The results files: rows appended to a JSONL file (`runs.jsonl`, `comm.jsonl`) and read back by one reader,
files written whole or not at all, and computed values cached under `<results_dir>/.cache/` (what a run folder
holds is `bench.runfolder`'s). No torch here: `python -m bench.report` reads results without it.

Every row of every command starts with `run_fields`, whatever happened to the run; a run that measured
nothing keeps the measured fields, null, so that every row of one command has one schema.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.errors import is_integer

# More than a row takes (about 6 KB). An empty file needs no data block, so creating one succeeds on a full disk
# (a full tmpfs let the old check pass, and the run died later in the controller); random bytes, as compressing
# file systems (ZFS, btrfs) allocate nothing for zeros.
WRITE_CHECK_BYTES = 16 * 1024


def folder_problem(folder: str) -> str | None:
    """Why bench cannot write under `folder` (not a folder, no permission, a full disk), or None if it can: a
    file of `WRITE_CHECK_BYTES` written to the disk (fsync) and removed."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path, prefix=".write-check-")
        try:
            content, written = os.urandom(WRITE_CHECK_BYTES), 0
            while written < len(content):  # a short write is the disk filling up: the next one says so
                written += os.write(fd, content[written:])
            os.fsync(fd)  # NFS and quotas may report a full disk only here
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return f"{exc.strerror or exc} ({exc.filename or path})"
    return None


def git_sha() -> str | None:
    """The commit of the bench source that ran (None outside a git checkout, e.g. a wheel install)."""
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_fields(cfg: dict, run_dir: Path, started_at: str, overrides: list[str]) -> dict:
    """The fields every row has: which run, how it ended (filled in later), where it ran and with what."""
    launch = cfg["launch"]
    return {
        "run_id": run_dir.name,
        "started_at": started_at,
        "status": None,
        "error": None,
        "failed_rank": None,
        "warnings": [],
        "launcher": launch["name"],
        "world_size": launch["nnodes"] * launch["nproc"],
        "nnodes": launch["nnodes"],
        "nproc": launch["nproc"],
        "device": cfg["device"],
        "python_version": platform.python_version(),
        "host": socket.gethostname(),
        "git_sha": git_sha(),
        "slurm_job_id": None,
        "stuck_at": None,  # at a timeout: where each rank was, {rank: "function (file:line)"}
        "stuck_collective": None,  # at a timeout: {rank: "op #seq on group, completed or not"}, its last collective
        "duration_s": None,
        "run_dir": str(run_dir),
        "overrides": overrides,
        "config": cfg,
    }


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line, whole or not at all, under an exclusive lock (concurrent writers never interleave).

    A write the disk cannot take whole (full, quota, file size limit) is undone, the file cut back to its
    size before it, and the error raised: the caller must tell the user the row is not there. A file that
    does not end in a newline (a line cut off by an older writer's crash) gets one first, so that line can
    never swallow this row; the reader skips it with a warning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """`path` holds `data` whole, or keeps what it held."""
    write_bytes_atomic(path, json.dumps(data, default=str).encode())


def write_bytes_atomic(path: Path, content: bytes) -> None:
    """`path` holds `content` whole, or keeps what it held: written beside it, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv_atomic(path: Path, lines: list[list]) -> None:
    """`path` holds the CSV of `lines` whole, or keeps what it held: a file cut off by a full disk could be read
    as a run's steps."""
    text = io.StringIO()
    csv.writer(text).writerows(lines)
    write_bytes_atomic(path, text.getvalue().encode())


def read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a results file, and one message per line that is not a row (a line cut off by a crash or a
    full disk, a hand edit, bytes that are not UTF-8, JSON that is not an object): such lines are skipped,
    never fatal, and never taken for a row."""
    numbered, problems = read_numbered_rows(path)
    return [row for _, row in numbered], problems


def rows_if_any(path: Path) -> list[dict]:
    """The rows of a results file that may not exist yet (then none); lines that are not rows are skipped, as
    `read_rows` skips them."""
    return read_rows(path)[0] if path.is_file() else []


def read_numbered_rows(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """As `read_rows`, each row with its line number."""
    rows, problems = [], []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problems.append(f"{path}:{number}: skipped, not UTF-8 text")
                continue
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{number}: skipped, not valid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{number}: skipped, not a JSON object")
                continue
            rows.append((number, row))
    return rows, problems


def cached_json(results_dir: str | Path, kind: str, key: dict, compute) -> dict:
    """`compute()`, kept in `<results_dir>/.cache/<kind>/<hash of key>.json` and read back by every later call
    with the same key (a file that does not parse is computed again)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(results_dir) / ".cache" / kind / f"{digest}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        write_bytes_atomic(path, json.dumps(value).encode())
    except OSError:  # a full disk: the value stands, uncached (the FLOP count of a run on one must not be lost)
        pass
    return value


# The shape of a run row, checked before the report or the planner reads it (`run_row_problem`): a hand edit or
# another writer's `"status": ["ok"]`, `"config": "x"` or `"global_batch": "64"` crashed `bench.report`
# (AttributeError in bench.configs.flatten) and `bench.plan` (TypeError in bench.plan.throughput) before these checks.
TEXT_FIELDS = ("status", "strategy", "model", "device_name", "host", "device", "run_id", "run_dir", "started_at",
               "error")
WHOLE_FIELDS = ("world_size", "nproc", "nnodes", "devices", "global_batch", "omp_num_threads")  # counts, >= 1
MOST = 2**53  # the largest count a float holds exactly (10**30 overflowed the report's Int64 columns)
RUN_NUMBERS = (
    "samples_per_s tokens_per_s step_time_ms_mean step_time_ms_p50 step_time_ms_p90 step_time_ms_p99 "
    "step_time_ms_std first_step_ms data_wait_pct peak_mem_mb tflops_per_device mfu_pct loss_first loss_last "
    "mem_params_mb mem_grads_mb mem_optim_mb mem_activations_mb mem_temp_mb hfu_pct parity_max_rel_diff "
    "profile_step_time_ms compute_pct comm_pct comm_exposed_pct overlap_pct profile_data_wait_pct idle_pct"
).split()  # the numbers the report reads (`table.runs_frame`)
# What is divided by, or drawn on a log axis: never negative, NaN nor infinite (bench writes null where it measured
# nothing; nothing in bench/measure makes a NaN or an inf). A loss may be NaN or inf: a run that diverged.
MEASURES = ("samples_per_s", "samples_per_s_per_device", "tokens_per_s", "tokens_per_s_per_device",
            "step_time_ms_mean", "step_time_ms_p50", "step_time_ms_p90", "step_time_ms_p99", "peak_mem_mb",
            "hardware_flops_per_step", "model_flops_per_step")
NUMBER_FIELDS = (*RUN_NUMBERS, *(m for m in MEASURES if m not in RUN_NUMBERS))


def is_number(value) -> bool:
    """A JSON number (true and false are Python ints: not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_row_problem(row) -> str | None:
    """What makes `row` unreadable as a run row, or None: an object whose text fields are text, `config` an
    object, counts whole numbers >= 1, numbers numbers (`MEASURES` finite and >= 0), `parity_ok` true or false;
    null (or absent) anywhere. A row missing what places a run is read, and listed incomplete (`REQUIRED_FIELDS`)."""
    if not isinstance(row, dict):
        return "not a JSON object"
    for key in TEXT_FIELDS:
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"{key} is {row[key]!r}, expected text or null"
    if row.get("config") is not None and not isinstance(row["config"], dict):
        return f"config is {row['config']!r}, expected an object or null"
    for section in ("strategy", "model"):  # their names group the runs (`table`): a list there is unhashable
        name = (row.get("config") or {}).get(section)
        name = name.get("name") if isinstance(name, dict) else None
        if name is not None and not isinstance(name, str):
            return f"config.{section}.name is {name!r}, expected text or null"
    for key in WHOLE_FIELDS:
        value = row.get(key)
        if value is not None and not (is_integer(value) and 1 <= value <= MOST):
            return f"{key} is {value!r}, expected a whole number from 1 to 2**53, or null"
    for key in NUMBER_FIELDS:
        value = row.get(key)
        if value is not None and not is_number(value):
            return f"{key} is {value!r}, expected a number or null"
        if value is not None and key in MEASURES and not (math.isfinite(value) and value >= 0):
            return f"{key} is {value!r}, expected a finite number >= 0 or null"
    if row.get("parity_ok") is not None and not isinstance(row["parity_ok"], bool):
        return f"parity_ok is {row['parity_ok']!r}, expected true, false or null"
    return None


def checked_rows(path: Path, problem: Callable[[dict], str | None]) -> tuple[list[tuple[int, dict]], list[str]]:
    """`read_numbered_rows`, and the rows `problem` finds something wrong with skipped too: one message per line
    skipped, naming the file, the line and why (the lines that are not rows first, then the rows that are bad)."""
    numbered, problems = read_numbered_rows(path)
    kept = []
    for number, row in numbered:
        why = problem(row)
        if why:
            problems.append(f"{path}:{number}: skipped, {why}")
        else:
            kept.append((number, row))
    return kept, problems
