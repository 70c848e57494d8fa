"""Helpers every test module shares: the config tree composed in-process, and `python -m bench` run as a user
runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench import results

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


def compose_config(*overrides: str, config_name: str = "config", hydra: bool = False):
    """The config `python -m bench <overrides>` composes (an OmegaConf object), without running anything."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra)


def compose_plain(*overrides: str, config_name: str = "config") -> dict:
    """The composed config resolved to plain data, as the controller sees it before its checks."""
    return OmegaConf.to_container(compose_config(*overrides, config_name=config_name), resolve=True)


def run_bench(
    *overrides: str,
    results_dir: Path,
    timeout: float = 180,
    cwd: Path | None = None,
    python: str = sys.executable,
    module: str = "bench",
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """`python -m bench <overrides>` as a user runs it, in a fresh process, with progress bars off."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", **(env or {})}
    flags = [arg for arg in overrides if arg.startswith("-")]  # Hydra's flags (-m) precede the overrides
    rest = [arg for arg in overrides if not arg.startswith("-")]
    # force=true: no memory prediction before every run of the suite (about a second each); the prediction and
    # its refusal have their own tests (tests/test_plan.py)
    force = ["force=true"] if module == "bench" and not any(a.startswith("force=") for a in rest) else []
    progress = ["progress=false", *force] if module == "bench" else []
    return subprocess.run(
        [python, "-m", module, *flags, f"results_dir={results_dir}", *progress, *rest],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
        env=env,
    )


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file, which bench must have written whole: any unreadable line fails the test."""
    rows, problems = results.read_rows(path)
    assert problems == []
    return rows


def sweep_rows(results_dir: Path) -> list[dict]:
    """The rows of the one sweep under `results_dir`."""
    (sweep,) = (results_dir / "sweeps").iterdir()
    return read_rows(sweep / "runs.jsonl")


@pytest.fixture
def bench(tmp_path):
    """Run bench with results under a temporary folder; returns (process, rows of runs.jsonl)."""

    def _run(*overrides: str, **kwargs):
        proc = run_bench(*overrides, results_dir=tmp_path, **kwargs)
        runs = tmp_path / "runs.jsonl"
        return proc, read_rows(runs) if runs.exists() else []

    return _run


GROUPS = ("strategy", "model", "data")


def case_file(overrides: dict) -> str:
    """A config like conf/experiment/*.yaml: the group choices as default overrides, dotted keys nested."""
    values: dict = {"defaults": [{f"override /{key}": overrides[key]} for key in GROUPS if key in overrides]}
    overrides = {"verify": True, **overrides}
    for key, value in overrides.items():
        if key in GROUPS:
            continue
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return "# @package _global_\n" + yaml.safe_dump(values, sort_keys=False)


def run_cases(base: Path, cases: dict[str, dict], common: list[str], env: dict | None = None) -> dict[str, dict]:
    """Run every case as a job of ONE Hydra multirun (`+case=<name>`, a config file each under `base`), so the
    controller starts once and the single-device references are run once for all the cases that share them;
    returns each case's row by name."""
    (base / "conf" / "case").mkdir(parents=True)
    for name, overrides in cases.items():
        (base / "conf" / "case" / f"{name}.yaml").write_text(case_file(overrides))
    proc = run_bench("-m", f"hydra.searchpath=[file://{base / 'conf'}]", f"+case={','.join(cases)}", *common,
                     results_dir=base / "results", timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_case = {}
    for row in sweep_rows(base / "results"):
        (case,) = [o.split("=", 1)[1] for o in row["overrides"] if o.startswith("+case=")]
        by_case[case] = row
    assert sorted(by_case) == sorted(cases), "one row per case, all in the sweep's runs.jsonl"
    return by_case


@pytest.fixture(scope="session")
def strategy_rows(tmp_path_factory) -> dict[str, dict]:
    """The row of every case of tests/strategy_cases.py, by name: one multirun, shared by the parity and the
    profiling tests."""
    from strategy_cases import CASES, COMMON

    return run_cases(tmp_path_factory.mktemp("strategies"), CASES, COMMON)
