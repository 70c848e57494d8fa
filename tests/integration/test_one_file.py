"""A strategy and a launcher are one module and one config each, for every command: a copy of ddp and a copy of
the local launcher, added to a copy of bench under new names and nothing else edited, are run with verify=true (their
memory checked before the run), planned with memory and step time by `bench.plan`, and run by `bench.search`, whose
frontier probes run out of memory and whose second run resumes from the first."""

import os
import shutil

import pytest

from conftest import REPO, read_rows, run_bench

STRATEGY, LAUNCHER = "ddp2", "here"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """bench and its configs copied, with `bench/strategies/ddp2.py` + `conf/strategy/ddp2.yaml` and
    `bench/launch/here.py` + `conf/launch/here.yaml` added: copies of ddp's and local's, renamed."""
    root = tmp_path_factory.mktemp("added")
    for folder in ("bench", "conf"):
        shutil.copytree(REPO / folder, root / folder, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for group, original, name in (("strategy", "ddp", STRATEGY), ("launch", "local", LAUNCHER)):
        package = "strategies" if group == "strategy" else "launch"
        shutil.copy(REPO / "bench" / package / f"{original}.py", root / "bench" / package / f"{name}.py")
        text = (REPO / "conf" / group / f"{original}.yaml").read_text()
        (root / "conf" / group / f"{name}.yaml").write_text(text.replace(f"name: {original}\n", f"name: {name}\n"))
    return root


def bench(tree, *overrides: str, module: str = "bench", timeout: float = 600):
    """A command of the copy, from its own folder: neither this checkout nor its editable install is imported."""
    env = {"PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return run_bench(*overrides, results_dir=tree / "results", cwd=tree, module=module, env=env, timeout=timeout)


GPT = ["model=gpt", "launch.omp_num_threads=1", f"launch={LAUNCHER}"]
# an H100 node's links (a preset of plan.networks) and an assumed throughput: the plan prices the step without
# this machine's collectives measured
PLAN = [*GPT, "plan.world_sizes=[2]", "plan.activation_checkpointing=[false]", "plan.device_tflops=0.02",
        "plan.network=h100-nvlink-ib400"]


def test_the_new_strategy_runs_under_the_new_launcher_checked_against_one_device(tree):
    proc = bench(tree, *GPT, f"strategy={STRATEGY}", "launch.nproc=2", "verify=true", "steps=4", "warmup=1",
                 "global_batch=16", "force=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = read_rows(tree / "results" / "runs.jsonl")
    assert (row["strategy"], row["launcher"], row["status"]) == (STRATEGY, LAUNCHER, "ok")
    assert row["parity_ok"], {k: v for k, v in row.items() if k.startswith("parity")}
    assert row["predicted_peak_mem_mb"] == pytest.approx(row["peak_mem_mb"], rel=0.1), "its memory checked first"
    assert not [w for w in row["warnings"] if w.startswith("memory:")]


def test_the_new_strategy_is_planned_and_searched(tree):
    import pandas as pd

    proc = bench(tree, *PLAN, "global_batch=16", module="bench.plan")  # every strategy, by default
    assert proc.returncode == 0, proc.stderr[-3000:]
    (plan,) = (tree / "results" / "plans").glob("*/plan.csv")
    (line,) = [line for line in pd.read_csv(plan).to_dict("records") if line["strategy"] == STRATEGY]
    assert line["status"] == "fits" and line["layout"] == "2x1x1"
    assert line["predicted_peak_mb"] > 0 and line["predicted_step_ms"] > 0 and line["predicted_comm_ms"] > 0

    # 0.1 GB a rank: the GPT's frontier lies near 70 samples a replica, where a probe takes seconds
    search = [*PLAN, f"plan.strategies=[{STRATEGY}]", "global_batch=32", "plan.device_memory_gb=0.1",
              "search.top_k=1", "search.max_probes=1", "search.steps=3", "search.warmup=1"]
    proc = bench(tree, *search, module="bench.search")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tree / "results" / "search"
    runs = pd.read_csv(folder / "search.csv")
    top = runs[runs["kind"] == "top"].iloc[0]
    assert top["strategy"] == STRATEGY and top["status"] == "ok" and top["measured_step_ms"] > 0
    assert abs(top["peak_mb_error_pct"]) < 10, "the memory prediction holds for the run it picked"
    rows = read_rows(folder / "runs.jsonl")
    assert {(r["strategy"], r["launcher"]) for r in rows} == {(STRATEGY, LAUNCHER)}
    assert rows[0]["predicted_step_time_ms"] == pytest.approx(top["predicted_step_ms"], rel=1e-3), "in the row"
    probes = runs[runs["kind"] == "frontier"]
    assert len(probes) == 1 and set(probes["status"]) <= {"ok", "oom"}
    (frontier,) = pd.read_csv(folder / "frontier.csv").to_dict("records")
    if "oom" in set(probes["status"]):  # an oom row is kept, and bounds the frontier from above
        assert frontier["first_oom_batch_per_replica"] > 0
    assert (folder / "prediction_error.png").is_file()  # run again, it runs nothing: tests/unit/test_search_resume.py
