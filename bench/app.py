"""The Hydra app every bench command is. `python -m bench` (training) and `python -m bench.comm` (collectives)
differ only in the `Command` they pass to `main`.

The app composes the config once, resolves it to plain data, lets the command check and pin it (a bad config
is one line and exit 2, or in a sweep a `skipped` row and the sweep goes on), runs the command, prints its
summary, and turns how each job ended into the process's exit code: 0 when every job succeeded, 1 when one
failed, 2 for a rejected config, 128 + signal when the user interrupted (which ends a sweep at once). The
commands' ranks never import Hydra: they read the resolved config from their run folder.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bench import conf_dir
from bench.errors import ConfigError
from bench.launch import LaunchOutcome, launcher_spec
from bench.launch.world import prepare_argv
from bench.overrides import refuse, refuse_bad_shape, refuse_what_hydra_cannot_compose, shortened
from bench.results import append_row, folder_problem


@dataclass(frozen=True)
class JobResult:
    rows: list[dict] | None  # None where another controller records the rows (multinode, inline ranks != 0)
    outcome: LaunchOutcome
    ok: bool  # every row a success


@dataclass(frozen=True)
class Command:
    name: str  # how messages start: "bench", "bench.comm"
    config_name: str  # the primary config in conf/
    results_file: str  # where rows go: <results_dir>/<results_file>, or the sweep folder's
    run_name: str  # Hydra interpolation naming the run folders of multinode and inline runs
    prepare: Callable[[dict], object]  # check (raise ConfigError) and resolve the config the ranks will read
    run: Callable[[object, Path, Path, list[str]], JobResult]  # launch what `prepare` resolved, record rows
    empty_row: Callable[[dict, Path, str, list[str]], dict]  # the row of a job that measured nothing
    print_summary: Callable[[list[dict], Path], None]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def main(command: Command) -> None:
    # `--local-rank` (python -m torch.distributed.launch) out; multinode/inline run folders named after an id
    # every node shares
    sys.argv = prepare_argv([sys.argv[0], *expand_switches(sys.argv[1:])], run_name=command.run_name)
    refuse_what_hydra_cannot_compose(command.name, command.config_name, sys.argv[1:])
    exit_codes: list[int] = []

    @hydra.main(version_base=None, config_path=str(conf_dir()), config_name=command.config_name)
    def app(cfg: DictConfig) -> None:
        code = run_job(command, cfg)
        if code >= 128:
            sys.exit(code)  # the user asked to stop: end the sweep too, after this job's rows are written
        exit_codes.append(code)

    app()
    exit_when_done(max(exit_codes, default=0))


def exit_when_done(code: int) -> None:
    """Exit with `code`, not waiting on threads the user's code started (a model constructor's): the rows are
    written, and Python would otherwise hold the controller open until they end."""
    import threading

    left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if not left:
        sys.exit(code)
    print(f"bench: exiting without waiting for threads the model's code started ({', '.join(left)})",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


SWITCHED_GROUPS = ("profile",)  # groups with an `enabled` key that `<group>=true` switches


def expand_switches(args: list[str]) -> list[str]:
    """`profile=true` (or `=false`, or a sweep `=true,false`) means `profile.enabled=...`: left to Hydra, it
    would replace the whole group with the bool, and a `profile.steps=10` beside it would fail."""
    expanded = []
    for arg in args:
        key, sep, value = arg.partition("=")
        expanded.append(f"{key}.enabled={value}" if sep and key in SWITCHED_GROUPS else arg)
    return expanded


def run_job(command: Command, cfg: DictConfig) -> int:
    """One job of the app (the only one, or one of a sweep): its exit code."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    # Relative folders are relative to where bench was started, as Hydra made the run folder from them:
    # hydra.job.chdir=true has moved this process into the run folder, where runs.jsonl would otherwise land.
    # Resolved in the config itself, before its interpolations are (data.dir is ${results_dir}/datasets).
    started_in = Path(hydra_cfg.runtime.cwd)
    cfg.results_dir = str((started_in / cfg.results_dir).resolve())
    folder = (started_in / hydra_cfg.sweep.dir).resolve() if multirun else Path(cfg.results_dir)
    results_file = folder / command.results_file
    if results_file.exists() and not results_file.is_file():
        refuse("results_dir" if not multirun else "hydra.sweep.dir",
               f"a folder whose {command.results_file} is a file, got {str(folder)!r} where it is not a file")
    plain = OmegaConf.to_container(cfg, resolve=True)
    overrides = list(hydra_cfg.overrides.task)
    try:
        plain = command.prepare(plain)
    except ConfigError as exc:
        if not multirun:
            print(f"{command.name}: invalid config: {exc}", file=sys.stderr)
            return 2
        # One combination of a sweep that cannot run must not end the sweep: record it and go on.
        print(f"{command.name}: skipping {' '.join(overrides)}: {exc}", file=sys.stderr)
        row = command.empty_row(plain, run_dir, now(), overrides)
        row.update(status="skipped", error=str(exc), duration_s=0.0)
        append_row(results_file, row)
        return 0
    result = command.run(plain, run_dir, results_file, overrides)
    outcome = result.outcome
    if result.rows is None:
        print(f"{command.name}: {outcome.note}", file=sys.stderr)
    else:
        command.print_summary(result.rows, results_file)
    if outcome.status == "interrupted":
        return 128 + outcome.signal
    return 0 if result.ok else 1


class GuardFolders(Callback):
    """Before Hydra makes any folder: refuse folders bench cannot write, and a run or sweep folder another bench
    is using, with the key to change. The lock on the folder is held until this process ends."""

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs) -> None:
        # again here, where the command line had flags that skipped it (`refuse_what_hydra_cannot_compose`)
        refuse_bad_shape("bench", config_name or "config", config)
        self._check(config, "results_dir", config.results_dir)
        self._check(config, "hydra.run.dir", config.hydra.run.dir, lock=True)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "results_dir", config.results_dir)
        self._check(config, "hydra.sweep.dir", config.hydra.sweep.dir, lock=True)

    def _check(self, config: DictConfig, key: str, folder: str, lock: bool = False) -> None:
        problem = folder_problem(folder)
        if problem:
            refuse(key, f"a folder bench can write, got {shortened(folder)!r}: {shortened(problem, 200)}")
        # a folder shared between nodes or ranks by design (launch=multinode, inline) is never locked
        shared = launcher_spec(config.launch.name).shares_run_folder
        if lock and not shared and not hold_lock(Path(folder)):
            refuse(key, f"a folder no other bench is using, got {folder!r} (another bench process holds "
                   f"{Path(folder) / LOCK_FILE})", "; or wait for that run to end")


LOCK_FILE = ".bench.lock"
_held_locks: list[int] = []  # open for the process's life: the kernel drops the locks when it ends


def hold_lock(folder: Path) -> bool:
    """An exclusive lock on `<folder>/.bench.lock` (not across NFS clients, where flock may not hold)."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _held_locks.append(fd)
    return True
