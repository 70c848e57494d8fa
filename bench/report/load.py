"""Reading results: the rows of runs.jsonl files, each run's steps.csv, and the keys that say which runs
are repeats of one configuration.

Two runs are repeats of one configuration when they ran the same configuration (`bench.configs`: their resolved
configs agree on every key but the run-specific ones) on the same machine (device_name and host). The machine is
kept apart from the config id so that a comparison can tell "same configuration on other hardware" from
"another configuration".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from bench.configs import configuration, configuration_id, digest
from bench.results import checked_rows, run_row_problem
from bench.runfolder import CONFIG, ROW, STEPS

RUNS_FILE = "runs.jsonl"
# What places a run: without any of these a row is shown as `incomplete` with the missing fields empty, never
# with a value made up for them.
REQUIRED_FIELDS = ("status", "strategy", "model", "world_size", "global_batch")
# Keys a scaling series varies along (besides global_batch, which depends on the kind of scaling).
LAUNCH_PREFIX = "launch."
STRATEGY_PREFIX = "strategy."
PARALLEL_PREFIX = "parallel."


class ReportError(Exception):
    """A problem with the report's inputs or options: the CLI prints it and exits 2."""


def runs_file(path: str | Path) -> Path:
    """The runs.jsonl a user means by `path`: the file itself or the one in that folder."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / RUNS_FILE).is_file():
        return path / RUNS_FILE
    if not path.exists():
        raise ReportError(f"{path}: no such file or folder")
    nested = sorted(p.parent for p in path.glob(f"**/{RUNS_FILE}"))[-5:]
    hint = "; results found under it: " + ", ".join(str(p) for p in nested) if nested else ""
    raise ReportError(f"{path}: no {RUNS_FILE} in this folder{hint}")


def load_rows(paths: list[str | Path]) -> tuple[list[dict], list[str]]:
    """Every row of the runs.jsonl files named by `paths` (files or folders), with the warnings met.

    Each row gets `_runs_file`, the file it came from (to find its run folder if the results were moved).
    A line that is not a JSON object (a writer killed mid-line), or not a run row (`run_row_problem`), is
    skipped with a warning naming the file and line (see `bench.results.read_rows`) rather than losing the
    whole file.
    """
    rows: list[dict] = []
    warnings: list[str] = []
    for path in paths:
        source = runs_file(path)
        found, problems = checked_rows(source, run_row_problem)
        warnings += problems
        for number, row in found:
            missing = [key for key in REQUIRED_FIELDS if row.get(key) is None]
            if missing:
                warnings.append(f"{source}:{number}: the row lacks {', '.join(missing)}: listed as incomplete, "
                                "counted nowhere")
            rows.append({**row, "_runs_file": str(source), "_missing": missing})
    if not rows:
        raise ReportError("no runs in " + ", ".join(str(runs_file(p)) for p in paths))
    return rows, warnings


def load_run_folder_rows(paths: list[str | Path]) -> tuple[list[dict], list[str]]:
    """The rows every run wrote into its own folder (`row.json`), found under `paths`: the sweep's rows rebuilt
    without its runs.jsonl. A row.json that is not a run row, and a run folder without one, are skipped with a
    warning naming the file or folder."""
    rows: list[dict] = []
    warnings: list[str] = []
    for path in paths:
        if not Path(path).is_dir():
            raise ReportError(f"{path}: not a folder (--from-run-folders reads the row.json of each run under it)")
        warnings += [f"{folder}: skipped, a run folder without row.json (the run is still going, or ended before "
                     "writing its row)" for folder in folders_without_row(Path(path))]
        for row_file in sorted(Path(path).rglob(ROW)):
            try:
                row = json.loads(row_file.read_text())
            except (OSError, ValueError) as exc:
                warnings.append(f"{row_file}: skipped, not a row ({exc})")
                continue
            why = run_row_problem(row)
            if why:
                warnings.append(f"{row_file}: skipped, {why}")
                continue
            missing = [key for key in REQUIRED_FIELDS if row.get(key) is None]
            if missing:
                warnings.append(f"{row_file}: the row lacks {', '.join(missing)}: listed as incomplete, counted "
                                "nowhere")
            rows.append({**row, "_runs_file": str(row_file), "_missing": missing})
    if not rows:
        raise ReportError("no row.json under " + ", ".join(str(p) for p in paths))
    rows.sort(key=lambda r: str(r.get("started_at")))
    return rows, warnings


def folders_without_row(root: Path) -> list[Path]:
    """The training runs' folders under `root` that hold no row.json: a folder with the config.json the controller
    writes first or the steps.csv it writes beside row.json (`bench.runfolder`). Not a bench.comm run's (its
    config has `comm`; its rows go to comm.jsonl), nor one under a hidden folder (`.parity-reference/`:
    verify=true's reference run, which has no row)."""
    found = []
    for folder in sorted({marker.parent for name in (CONFIG, STEPS) for marker in root.rglob(name)}):
        if (folder / ROW).exists() or any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue
        try:
            written = json.loads((folder / CONFIG).read_text())
        except (OSError, ValueError):  # no config, or one cut off: still a run without its row
            written = None
        if not (isinstance(written, dict) and "comm" in written):
            found.append(folder)
    return found


def config_items(row: dict) -> dict:
    """The row's config as dotted keys, run-specific keys left out."""
    return configuration(row.get("config"))


def config_id(row: dict) -> str:
    """Same id <=> same configuration (repeats). Hardware is not part of it: `device` (cpu/cuda, or `auto`
    in a skipped row that was never resolved) is told apart by the row's `device_name`."""
    return configuration_id(row.get("config"), ignoring=("device",))


def strategy_keys(items: dict) -> set[str]:
    """The keys that come with the strategy: its knobs, `strategy.*`. Rows written by older versions kept
    some knobs in a top-level section named after the strategy (`pipeline.*` for strategy=pipeline), as the
    committed example rows still do: such a section counts as the strategy's too."""
    own = f"{items.get('strategy.name')}."
    return {k for k in items if k.startswith((STRATEGY_PREFIX, own))}


def scaling_id(row: dict) -> str:
    """Same id <=> runs that differ at most in strategy (with its options and parallel degrees), launch
    (world size) and global batch: the runs one scaling analysis may compare."""
    items = config_items(row)
    drop = strategy_keys(items) | {"global_batch", "device"}
    drop |= {k for k in items if k.startswith((LAUNCH_PREFIX, PARALLEL_PREFIX))}
    return digest({k: v for k, v in items.items() if k not in drop})


def strategy_id(row: dict) -> str:
    """The strategy with its options (e.g. ddp's bucket size). Not its parallel degrees: those follow the
    world size (dp = N / (tp * pp)), so they would split a scaling series; see `table.layout`."""
    items = config_items(row)
    return digest({k: items[k] for k in strategy_keys(items)})


def run_dir(recorded: str | None, run_id: str | None, runs_file: str | None) -> Path | None:
    """A run's folder: `recorded` (the row's run_dir) if it exists, else the folder named `run_id` (or as
    recorded) found again beside `runs_file` if the results were moved; None when it is gone."""
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    name = run_id or Path(recorded or "").name
    if not name or not runs_file:
        return None
    base = Path(runs_file).parent
    for candidate in (base / name, *base.glob(f"*/{name}")):
        if candidate.is_dir():
            return candidate
    return None


def read_steps(folder: str | Path | None) -> pd.DataFrame | None:
    """A run folder's steps.csv (step, measured, step_time_ms, loss, data_wait_ms_max, step_time_ms_rank<r>),
    or None when there is none."""
    if folder is None or not (Path(folder) / "steps.csv").is_file():
        return None
    return pd.read_csv(Path(folder) / "steps.csv")


def steps_by_configuration(runs: pd.DataFrame) -> dict[tuple[str, str], list[pd.DataFrame]]:
    """(config_id, machine) -> the steps.csv frames of its ok runs (see `table.runs_frame`)."""
    found: dict[tuple[str, str], list[pd.DataFrame]] = {}
    for _, run in runs[runs["status"] == "ok"].iterrows():
        steps = read_steps(run["run_dir"])
        if steps is not None:
            found.setdefault((run["config_id"], run["machine"]), []).append(steps)
    return found


def number(value) -> float:
    """A row value as a float; None (a run that measured nothing) becomes NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
