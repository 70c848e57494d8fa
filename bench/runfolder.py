"""The run folder: what the controller, its launcher and the ranks leave in it, in one place.

    config.json, config.yaml    the resolved config the ranks read (written by the controller)
    ranks/rank<N>.json          each rank's results, stamped with the launch id (the controller reads only its own)
    logs/rank<N>.log            each rank's log
    pids/rank<N>                each rank's pid and start time, so that a controller whose deadline passed can ask it
    stacks/rank<N>.txt          ... where it hung (its Python stack) and
    stacks/rank<N>_collectives.json   its last collectives (the flight recorder, as JSON)
    collectives/rank<N>         the flight recorder's pickle, for torch's own analyser
    traces/rank<N>.json.gz      profile=true: each rank's trace
    params.pt                   verify=true: the final parameters, gathered on rank 0
    comm.json                   bench.comm: rank 0's measurements
    steps.csv, breakdown.csv, row.json   what the controller writes from the ranks' results

A launch from this machine alone first removes what an earlier launch left (`RESULT_FILES`): a reused folder (a
fixed hydra.run.dir, a sweep folder given twice) must never lend its results to a new run. No torch here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.results import write_json_atomic

CONFIG = "config.json"
RANKS, LOGS, PIDS, STACKS, COLLECTIVES, TRACES = "ranks", "logs", "pids", "stacks", "collectives", "traces"
PARAMS, COMM, STEPS, BREAKDOWN, ROW = "params.pt", "comm.json", "steps.csv", "breakdown.csv", "row.json"
RESULT_FILES = (RANKS, PARAMS, STEPS, ROW, COMM, PIDS, STACKS, COLLECTIVES)

LAUNCH_ID_ENV = "BENCH_LAUNCH_ID"  # which launch a rank belongs to: the controller reads only its own results
GATHER_ENV = "BENCH_GATHER_RESULTS"  # set by a launcher whose rank 0 records the row: results through the group


def rank_file(run_dir: Path, folder: str, rank: int | str, suffix: str = "") -> Path:
    """`<run_dir>/<folder>/rank<N><suffix>`."""
    return Path(run_dir) / folder / f"rank{rank}{suffix}"


def rank_of(path: Path, suffix: str = "") -> str:
    """N of a `rank<N><suffix>` file."""
    return path.name[len("rank"):len(path.name) - len(suffix)]


def ranks_in(run_dir: Path, folder: str, suffix: str = "") -> list[Path]:
    """The `rank<N><suffix>` files of a folder, by rank."""
    found = [p for p in (Path(run_dir) / folder).glob(f"rank*{suffix}") if rank_of(p, suffix).isdigit()]
    return sorted(found, key=lambda p: int(rank_of(p, suffix)))


def write_config(cfg, run_dir: Path) -> None:
    """config.json (what the ranks read) and config.yaml, each replaced atomically: the controllers of a
    multi-node run, or the ranks of an inline run, may share one run folder on a shared filesystem."""
    import yaml

    from bench.configs import thaw

    run_dir.mkdir(parents=True, exist_ok=True)
    plain = thaw(cfg)
    texts = {CONFIG: json.dumps(plain, indent=2), "config.yaml": yaml.safe_dump(plain, sort_keys=False)}
    for name, text in texts.items():
        tmp = run_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)


def read_config(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / CONFIG).read_text())


def stamped(result: dict) -> dict:
    """The result with the launch id of the process writing it (rank 0 writes every rank's file where results
    are gathered: its id is the one its controller knows)."""
    return {**result, "launch_id": os.environ.get(LAUNCH_ID_ENV)}


def write_rank_result(run_dir: Path, rank: int, result: dict) -> None:
    write_json_atomic(rank_file(run_dir, RANKS, rank, ".json"), stamped(result))


def read_rank_results(run_dir: Path, world_size: int, launch_id: str | None) -> dict[int, dict]:
    """The result files this launch's ranks wrote before teardown: missing ones are ranks that died before,
    and a file another launch left (a reused folder) counts as missing."""
    found = {}
    for rank in range(world_size):
        try:
            result = json.loads(rank_file(run_dir, RANKS, rank, ".json").read_text())
        except (OSError, ValueError):
            continue
        if result.get("launch_id") == launch_id:
            found[rank] = result
    return found


def handed_in(run_dir: Path, launch_id: str | None) -> int:
    """How many ranks of launch `launch_id` have written their results."""
    count = 0
    for path in ranks_in(run_dir, RANKS, ".json"):
        try:
            count += json.loads(path.read_text()).get("launch_id") == launch_id
        except (OSError, ValueError):  # being written
            pass
    return count
