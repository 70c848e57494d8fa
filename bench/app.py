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
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bench import conf_dir
from bench.checks import ConfigError
from bench.launch import LaunchOutcome
from bench.launch.world import prepare_argv
from bench.results import append_row


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
    prepare: Callable[[dict], dict]  # check (raise ConfigError) and pin the config the ranks will read
    run: Callable[[dict, Path, Path, list[str]], JobResult]  # launch, record rows
    empty_row: Callable[[dict, Path, str, list[str]], dict]  # the row of a job that measured nothing
    print_summary: Callable[[list[dict], Path], None]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def main(command: Command) -> None:
    # `--local-rank` (python -m torch.distributed.launch) out; multinode/inline run folders named after an id
    # every node shares
    sys.argv = prepare_argv(sys.argv, run_name=command.run_name)
    exit_codes: list[int] = []

    @hydra.main(version_base=None, config_path=str(conf_dir()), config_name=command.config_name)
    def app(cfg: DictConfig) -> None:
        code = run_job(command, cfg)
        if code >= 128:
            sys.exit(code)  # the user asked to stop: end the sweep too, after this job's rows are written
        exit_codes.append(code)

    app()
    sys.exit(max(exit_codes, default=0))


def run_job(command: Command, cfg: DictConfig) -> int:
    """One job of the app (the only one, or one of a sweep): its exit code."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    folder = Path(hydra_cfg.sweep.dir) if multirun else Path(cfg.results_dir)
    results_file = folder.resolve() / command.results_file
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["results_dir"] = str(Path(plain["results_dir"]).resolve())
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


class CheckResultsDir(Callback):
    """Refuse a results_dir that cannot be written, with the key to change, before Hydra makes any folder."""

    def _check(self, config: DictConfig) -> None:
        problem = results_dir_problem(config.results_dir)
        if problem:
            print(
                f"bench: invalid config: results_dir: expected a folder bench can write, got "
                f"{config.results_dir!r}: {problem}. Change `results_dir=` on the command line.",
                file=sys.stderr,
            )
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)


def results_dir_problem(results_dir: str) -> str | None:
    """Why bench cannot write under `results_dir`, or None if it can."""
    path = Path(results_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"{exc.strerror or exc} ({exc.filename or path})"
    return None
