"""Helpers every test module shares: the config tree composed in-process, and `python -m bench` run as a user
runs it. tests/unit runs nothing in another process; tests/integration launches real runs, and every test there is
`slow` (`python -m pytest -m "not slow"` is the unit tests)."""

import copy
import functools
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
INTEGRATION = REPO / "tests" / "integration"


def pytest_configure(config):
    """The workers share this machine's cores: torch's own threads in each (its default, one per core) would
    only contend. The runs the tests launch set their ranks' threads themselves."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


# The groups whose tests share one long multirun (or one SLURM node) on one worker, longest first: about 200,
# 175, 75 and 40 s of a worker here. Collected first, they start first, one on each worker, and the suite ends
# on short tests on both workers rather than on one worker alone with a group collected last by path
# (your_models).
LONG_GROUPS = ("your_models", "strategy_cases", "slurm", "fault_sweep")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.slow)
    items.sort(key=start_order)  # stable: the rest keep their order


def start_order(item) -> int:
    groups = [mark.args[0] for mark in item.iter_markers("xdist_group") if mark.args]
    return LONG_GROUPS.index(groups[0]) if groups and groups[0] in LONG_GROUPS else len(LONG_GROUPS)


def compose_config(*overrides: str, config_name: str = "config", hydra: bool = False):
    """The config `python -m bench <overrides>` composes (an OmegaConf object), without running anything.

    Hydra composes the config groups the overrides choose (strategy=, model=, +experiment=, ...), once per
    choice (cached: composing reads every yaml file again, about 0.1 s); the other overrides are then applied
    to a copy by Hydra's own function, as Hydra applies them after composing."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    chooses = [o for o in parsed if (CONF / o.key_or_group.split("@")[0]).is_dir() or o.key_or_group.startswith(
        "hydra")]
    cfg = copy.deepcopy(_composed(config_name, hydra, tuple(o.input_line for o in chooses)))
    ConfigLoaderImpl._apply_overrides_to_config([o for o in parsed if o not in chooses], cfg)
    return cfg


@functools.cache
def _composed(config_name: str, hydra: bool, overrides: tuple[str, ...]):
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


def materialized(model_cfg: dict, seed: int = 0, module=None):
    """The model (or `module`, a part of it) built on the meta device and filled by bench's rule, on the CPU."""
    from bench.models import build_on_meta, model_spec
    from bench.models.init import materialize

    return materialize(module if module is not None else build_on_meta(model_cfg), "cpu", seed,
                       model_spec(model_cfg).init_std)


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
        *parents, leaf = key.lstrip("+").split(".")  # a key the config lacks: added by the case file alike
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return "# @package _global_\n" + yaml.safe_dump(values, sort_keys=False)


def run_cases(base: Path, cases: dict[str, dict], common: list[str], env: dict | None = None) -> dict[str, dict]:
    """Run every case as a job of ONE Hydra multirun (`+case=<name>`, a config file each under `base`), so the
    controller starts once and the single-device references are run once for all the cases that share them;
    returns each case's row by name. `common` ("key=value") goes into every case file, under the case's own
    values: on the command line it would override them (a case's `steps` would not count)."""
    shared = {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in common)}
    (base / "conf" / "case").mkdir(parents=True)
    for name, overrides in cases.items():
        (base / "conf" / "case" / f"{name}.yaml").write_text(case_file({**shared, **overrides}))
    proc = run_bench("-m", f"hydra.searchpath=[file://{base / 'conf'}]", f"+case={','.join(cases)}",
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
