"""The results files the planner reads, row by row: a row it cannot read (a hand edit, another writer, an older
bench) is skipped with one warning naming its file and line, never the plan's end."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from bench.errors import is_integer
from bench.results import checked_rows, run_row_problem

WARNED: set[str] = set()


def warn_once(line: str) -> None:
    """`line` on stderr, once per process: the planner reads the same results files for every layout it predicts
    (a plan of DDP and FSDP on 2 and 4 ranks, its throughput measured, reads runs.jsonl 20 times), and a bad row
    is worth one line."""
    if line not in WARNED:
        WARNED.add(line)
        print(f"warning: {line}", file=sys.stderr)


def planner_rows(path: Path, problem: Callable[[dict], str | None]) -> list[dict]:
    """The rows of the results file `path` (none where it does not exist) that `problem` finds nothing wrong with,
    each with `_where` (file:line); every other line skipped with one warning naming the file, line and why."""
    if not path.is_file():
        return []
    numbered, problems = checked_rows(path, problem)
    for line in problems:
        warn_once(line)
    return [{**row, "_where": f"{path}:{number}"} for number, row in numbered]


# The config keys the planner reads off a measured row itself (calibration, `core_share`), and what each holds.
ROW_CONFIG_KEYS = (("device", "text"), ("strategy.name", "text"), ("parallel.tp", "whole"), ("launch.nproc", "whole"),
                   ("launch.omp_num_threads", "whole or null"))
EXPECTED = {"text": "text", "whole": "a whole number >= 1", "whole or null": "a whole number >= 1 or null"}


def planner_row_problem(row: dict) -> str | None:
    """Why the planner cannot read this run row, or None: its shape (`bench.results.run_row_problem`), and
    in an `ok` row, a config with a model and `ROW_CONFIG_KEYS` (a row of an older bench has no `parallel`)."""
    why = run_row_problem(row)
    if why or row.get("status") != "ok":
        return why
    config = row.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return "an ok row without a config holding its model"
    for key, kind in ROW_CONFIG_KEYS:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        whole = is_integer(value) and value >= 1
        if not (isinstance(value, str) if kind == "text" else whole or (kind == "whole or null" and value is None)):
            return f"config.{key} is {value!r}, expected {EXPECTED[kind]}"
    return None
