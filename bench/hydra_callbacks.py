"""Hydra callbacks: checks that must run before Hydra itself creates the run folder."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


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


class CheckResultsDir(Callback):
    """Refuse a results_dir that cannot be written, with the key to change, before any folder is made."""

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
