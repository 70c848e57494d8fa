import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import results

REPO = Path(__file__).resolve().parent.parent


def run_bench(
    *overrides: str, results_dir: Path, timeout: float = 180, cwd: Path | None = None, python: str = sys.executable
) -> subprocess.CompletedProcess:
    """`python -m bench <overrides>` as a user runs it, in a fresh process, with progress bars off."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    flags = [arg for arg in overrides if arg.startswith("-")]  # Hydra's flags (-m) precede the overrides
    rest = [arg for arg in overrides if not arg.startswith("-")]
    return subprocess.run(
        [python, "-m", "bench", *flags, f"results_dir={results_dir}", "progress=false", *rest],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
        env=env,
    )


def read_rows(path: Path) -> list[dict]:
    """The rows of a runs.jsonl, which bench must have written whole: any unreadable line fails the test."""
    rows, problems = results.read_rows(path)
    assert problems == []
    return rows


@pytest.fixture
def bench(tmp_path):
    """Run bench with results under a temporary folder; returns (process, rows of runs.jsonl)."""

    def _run(*overrides: str, **kwargs):
        proc = run_bench(*overrides, results_dir=tmp_path, **kwargs)
        runs = tmp_path / "runs.jsonl"
        return proc, read_rows(runs) if runs.exists() else []

    return _run
