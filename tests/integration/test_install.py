"""bench as a user installs it, not as this checkout holds it: a wheel built from the repository, installed into an
environment of its own (no editable install's finder pointing back here), run from another folder. Every
subpackage and the configs ship in it; `python -m bench` runs its memory check (no `force`), and the other commands
run too."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

from conftest import REPO, read_rows


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A wheel of the checkout installed into a fresh virtualenv. Its dependencies (torch, hydra, ...) are this
    environment's, reached by a path file that adds their folder: a folder a path file adds is not scanned for
    path files, so no editable finder that points at the checkout is installed."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # setuptools builds in the source tree: a copy of what the wheel is made of
    for folder in ("bench", "conf"):
        shutil.copytree(REPO / folder, source / folder, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / file, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("bench-*.whl")
    env_dir = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
    (root / "env" / purelib.removeprefix(str(env_dir) + "/") / "dependencies.pth").write_text("\n".join(sorted(ours)))
    # --ignore-installed: with --prefix alone pip uninstalls the bench this environment has (the checkout's
    # editable install) before installing into the prefix, and every later `python -m bench` of the suite failed
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                    "--prefix", str(env_dir), str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return {"python": str(python), "cwd": elsewhere, "purelib": purelib}


def run(installed: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    return subprocess.run([installed["python"], *args], capture_output=True, text=True, cwd=installed["cwd"],
                          env=env, timeout=timeout)


def test_the_wheel_holds_every_subpackage_and_no_finder_points_here(installed):
    code = ("import json, pkgutil, sys, bench, bench.plan, bench.search; print(json.dumps({'file': bench.__file__, "
            "'packages': sorted(m.name for m in pkgutil.walk_packages(bench.__path__, 'bench.') if m.ispkg), "
            "'finders': [type(f).__module__ for f in sys.meta_path]}))")
    proc = run(installed, "-c", code)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["file"].startswith(installed["purelib"]), "the wheel's bench, not the checkout's"
    here = sorted(".".join(p.relative_to(REPO).parts) for p in (REPO / "bench").rglob("__init__.py"))
    assert found["packages"] == [name.removesuffix(".__init__.py") for name in here if name != "bench.__init__.py"]
    assert not [f for f in found["finders"] if "editable" in f], found["finders"]


def test_every_command_runs_from_the_installed_wheel(installed):
    results = installed["cwd"] / "results"
    proc = run(installed, "-m", "bench", "steps=3", "warmup=1", "progress=false", f"results_dir={results}")
    assert proc.returncode == 0, proc.stderr
    (row,) = read_rows(results / "runs.jsonl")
    assert row["status"] == "ok" and row["predicted_peak_mem_mb"] > 0, "its memory predicted and checked first"
    proc = run(installed, "-m", "bench.comm", "launch.nproc=2", "comm.collectives=[all_reduce]", "comm.max_bytes=4096",
               f"results_dir={results}")
    assert proc.returncode == 0, proc.stderr
    proc = run(installed, "-m", "bench.plan", "plan.world_sizes=[1,2]", "plan.strategies=[single,ddp]",
               "plan.activation_checkpointing=[false]", f"results_dir={results}")
    assert proc.returncode == 0, proc.stderr
    (plan,) = (results / "plans").glob("*/plan.csv")
    assert "ddp" in plan.read_text() and "step time not predicted" not in proc.stdout
    proc = run(installed, "-m", "bench.report", str(results), "--no-plots")
    assert proc.returncode == 0 and (results / "report" / "summary.csv").is_file(), proc.stderr
    proc = run(installed, "-m", "bench.search", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m bench.search"), proc.stderr
