"""The search's runs, and what lets a search run again resume from them: each run is a `python -m bench` child
(`bench.search.children`) unless `<folder>/runs.jsonl` holds the same configuration finished (`bench.configs`);
and the memory the frontier probes under is what the user asked the plan for, the same for every search in the
folder (`probe_memory_mb`), since a probe's `memory_limit_gb` is part of its configuration. No torch here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bench.configs import configuration_id
from bench.results import checked_rows, run_row_problem, write_json_atomic
from bench.search.children import run_child

if TYPE_CHECKING:
    from bench.plan.table import Planned
    from bench.run import Run

FINISHED = ("ok", "oom", "failed", "skipped")
MEMORY_FILE = "device_memory.json"


class Runner:
    """Runs `python -m bench` for a run unless `<folder>/runs.jsonl` holds the same configuration finished."""

    def __init__(self, folder: Path, user: list[str]):
        self.folder, self.user = folder, user
        self.launched = 0

    def finished(self, run: Run) -> list[dict]:
        wanted = configuration_id(run.config)
        return [r for r in self.rows() if r.get("status") in FINISHED and configuration_id(r.get("config")) == wanted]

    def rows(self) -> list[dict]:
        """The search folder's run rows; a line that is not one (a hand edit, a writer killed mid-line) is not a
        finished run, so its configuration runs again."""
        path = self.folder / "runs.jsonl"
        return [row for _, row in checked_rows(path, run_row_problem)[0]] if path.is_file() else []

    def run(self, run: Run, overrides: list[str]) -> dict | None:
        done = self.finished(run)
        if done:
            return done[-1]
        self.launched += 1
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"run{len(list(logs.iterdir()))}.txt").open("w") as log:
            log.write(" ".join(["python -m bench", *self.user, *overrides]) + "\n")
            log.flush()
            run_child([sys.executable, "-m", "bench", *self.user, *overrides, f"results_dir={self.folder}",
                       "progress=false"], log, self.folder)
        wanted = configuration_id(run.config)
        mine = self.finished(run) or [r for r in self.rows() if configuration_id(r.get("config")) == wanted]
        if mine and mine[-1].get("status") == "interrupted":
            raise KeyboardInterrupt
        return mine[-1] if mine else None


def probe_memory_mb(folder: Path, pick: Planned, configured: bool) -> tuple[float, str]:
    """What a rank of `pick`'s layout may hold in the frontier's probes, and where that comes from.

    `plan.device_memory_gb` where it is set (`configured`). Else this machine's memory as the first search in
    `folder` read it for that many ranks per node, kept in `<folder>/device_memory.json`: the plan reads
    MemAvailable anew each time (11.361 GB, then 11.0965 GB a search later), and a probe's `memory_limit_gb`,
    derived from it, is part of the configuration a search run again matches its finished runs on; with a new
    reading every probe of a finished search ran again. Remove the file to plan for a new reading."""
    if configured:
        return pick.device_memory_mb, pick.device_memory_from
    path = folder / MEMORY_FILE
    try:
        readings = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: read this time's
        readings = {}
    readings = readings if isinstance(readings, dict) else {}
    key = f"{pick.layout.ranks_per_node} rank(s) per node"
    if not isinstance(readings.get(key), dict) or not isinstance(readings[key].get("mb"), (int, float)):
        readings[key] = {"mb": pick.device_memory_mb, "from": pick.device_memory_from}
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, readings)
    return readings[key]["mb"], f"{readings[key].get('from')}, as first read for this folder ({path})"
