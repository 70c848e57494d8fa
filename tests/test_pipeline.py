"""strategy=pipeline: config checks, the split itself, and every schedule and mode against the single run.

The real runs are two Hydra multiruns sharing one results folder, so the single-device reference runs once
per model and the controller starts twice in all:
- distributed: {mlp, gpt} x launch.nproc={2, 4} x {gpipe, 1f1b, interleaved} with parallel.pp=2 and dp
  inferred (1 on 2 ranks, 2 on 4 ranks: the 2-D ddp+pipeline case). 1f1b and interleaved use 16
  micro-batches, which global_batch=16 does not divide into 2 replicas x 16: those two combinations are
  refused on 4 ranks and become `skipped` rows, leaving the five cases wanted (and covering micro-batches
  of one sample).
- inprocess: {mlp, gpt} on two "cpu" devices with the split-size trick.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import read_rows, run_bench
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.config import ConfigError, validate
from bench.models import build_model
from bench.strategies.pipeline import (
    SPLITS,
    InProcessPipeline,
    Stage,
    bubble_fraction,
    build_stages,
    partition,
    release_unowned,
)

CONF = Path(__file__).resolve().parent.parent / "conf"
COMMON = ("strategy=pipeline", "verify=true", "steps=4", "warmup=1", "global_batch=16", "++model.n_layers=4")


def compose_plain(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


# ------------------------------------------------------------------------------------ config checks


@pytest.mark.parametrize(
    "overrides,key,fragment",
    [
        (["launch.nproc=8"], "parallel.pp", "at most 4 pipeline stages"),
        (["launch.nproc=2", "pipeline.schedule=interleaved", "pipeline.stages_per_rank=4"],
         "pipeline.stages_per_rank", "at most 4 pipeline stages"),
        (["launch.nproc=2", "pipeline.microbatches=3"], "pipeline.microbatches", "divisible by dp x microbatches"),
        (["launch.nproc=4", "parallel.dp=2", "global_batch=8", "pipeline.microbatches=8"], "pipeline.microbatches",
         "global_batch=8 / parallel.dp=2"),
        (["launch.nproc=2", "pipeline.schedule=interleaved"], "pipeline.stages_per_rank", "at least 2"),
        (["launch.nproc=2", "pipeline.stages_per_rank=2"], "pipeline.stages_per_rank", "1 with pipeline.schedule"),
        (["launch.nproc=4", "pipeline.schedule=1f1b", "pipeline.microbatches=2"], "pipeline.microbatches",
         "at least the number of stages"),
        (["launch.nproc=2", "pipeline.schedule=zb"], "pipeline.schedule", "one of gpipe"),
        (["launch.nproc=2", "pipeline.mode=async"], "pipeline.mode", "one of distributed"),
        (["launch.nproc=2", "grad_accum=2"], "grad_accum", "micro-batches"),
        (["launch.nproc=2", "precision=fp16"], "precision", "fp32 or bf16"),
        (["launch.nproc=2", "pipeline.mode=inprocess"], "launch.nproc", "1 with strategy=pipeline"),
        (["pipeline.mode=inprocess", "pipeline.devices=[cpu,cpu,cpu,cpu,cpu]"], "pipeline.devices", "at most 4"),
        (["pipeline.mode=inprocess", "pipeline.devices=[tpu:0,cpu]"], "pipeline.devices", "entries"),
        (["pipeline.mode=inprocess", "pipeline.split_size=0"], "pipeline.split_size", "positive"),
        (["launch.nproc=4", "parallel.tp=2"], "parallel.tp", "1 with strategy=pipeline"),
    ],
)
def test_bad_pipeline_configs_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError, match=f"^{key}: expected .*{fragment}.*`{key}=`"):
        validate(compose_plain("strategy=pipeline", *overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["launch.nproc=2"],
        ["launch.nproc=2", "pipeline.schedule=interleaved", "pipeline.stages_per_rank=2"],
        ["launch.nproc=4", "parallel.dp=2", "pipeline.schedule=1f1b", "pipeline.microbatches=2", "global_batch=8"],
        ["model=gpt", "model.n_layers=4", "launch.nproc=4"],
        ["pipeline.mode=inprocess", "pipeline.split_size=8", "grad_accum=2"],
    ],
)
def test_good_pipeline_configs_validate(overrides):
    validate(compose_plain("strategy=pipeline", *overrides))


def test_default_degrees_infer_the_stages():
    cfg = compose_plain("strategy=pipeline")
    assert cfg["parallel"] == {"dp": 1, "tp": 1, "pp": -1}
    assert cfg["pipeline"]["mode"] == "distributed"


# ----------------------------------------------------------------------------------------- the split


def test_partition_and_bubble():
    assert partition(4, 2) == [[0, 1], [2, 3]]
    assert partition(5, 3) == [[0, 1], [2, 3], [4]]
    assert partition(4, 4) == [[0], [1], [2], [3]]
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)


MODELS = {
    "mlp": {"name": "mlp", "in_features": 16, "hidden": 32, "layers": 4, "classes": 5},
    "gpt": {"name": "gpt", "vocab_size": 50, "seq_len": 8, "d_model": 16, "n_layers": 4, "n_heads": 2,
            "mlp_ratio": 2},
}


def _model_and_input(name: str):
    torch.manual_seed(0)
    cfg = MODELS[name]
    model = build_model(cfg)
    x = torch.randn(6, cfg["in_features"]) if name == "mlp" else torch.randint(0, cfg["vocab_size"], (6, 8))
    return model, x


@pytest.mark.parametrize("name", sorted(SPLITS))
@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_stages_keep_the_full_models_names_and_compute_its_forward(name, n_stages):
    model, x = _model_and_input(name)
    stages = build_stages(model, SPLITS[name], n_stages)
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter once, same name
    h = x
    for stage in stages:
        h = stage(h)
    torch.testing.assert_close(h, model(x), rtol=0, atol=0)


@pytest.mark.parametrize("split_size", [None, 1, 4])
def test_inprocess_pipeline_matches_the_model(split_size):
    model, x = _model_and_input("gpt")
    expected = model(x)
    stages = build_stages(model, SPLITS["gpt"], 2)
    pipe = InProcessPipeline(model, stages, ["cpu", "cpu"], split_size)
    assert [n for n, _ in pipe.module.named_parameters()] == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(pipe(x), expected)


def test_layers_other_ranks_run_are_freed():
    model, _ = _model_and_input("mlp")
    stages = build_stages(model, SPLITS["mlp"], 2)
    release_unowned(model, [stages[1]])
    assert {n for n, p in model.named_parameters() if p.is_meta} == {n for n, _ in stages[0].named_parameters()}
    assert not any(p.is_meta for p in stages[1].parameters())


def test_stage_autocast():
    model, x = _model_and_input("mlp")
    (stage,) = build_stages(model, SPLITS["mlp"], 1, autocast_dtype=torch.bfloat16, device_type="cpu")
    assert stage(x).dtype == torch.bfloat16
    assert isinstance(stage, Stage)


# ------------------------------------------------------------------------------------ real runs, parity


@pytest.fixture(scope="module")
def pipeline_rows(tmp_path_factory):
    """Every row of both multiruns, keyed by (model, nproc, schedule or 'inprocess')."""
    results = tmp_path_factory.mktemp("pipeline")
    # every schedule and the 2-D mesh on the MLP; the GPT (same code path) on GPipe: CI time is finite
    distributed = run_bench(
        "-m", *COMMON, "model=mlp", "launch.nproc=2,4", "parallel.dp=-1", "parallel.pp=2",
        "pipeline=choice({schedule:gpipe},{schedule:1f1b,microbatches:16},"
        "{schedule:interleaved,stages_per_rank:2,microbatches:16})",
        results_dir=results, timeout=900,
    )
    gpt = run_bench("-m", *COMMON, "model=gpt", "launch.nproc=2", "pipeline.schedule=gpipe", results_dir=results,
                    timeout=300)
    inprocess = run_bench("-m", *COMMON, "model=mlp,gpt", "pipeline.mode=inprocess", "pipeline.split_size=4",
                          results_dir=results, timeout=300)
    rows = {}
    for proc in (distributed, gpt, inprocess):
        assert proc.returncode == 0, proc.stderr[-3000:]
    for runs in sorted(results.glob("sweeps/*/runs.jsonl")):
        for row in read_rows(runs):
            facts = row["strategy_facts"] or {}
            key = (row["model"], row["config"]["launch"]["nproc"],
                   facts.get("schedule", "inprocess") if row["status"] != "skipped" else "skipped")
            rows.setdefault(key, []).append(row)
    return rows


CASES = [("mlp", 2, "gpipe"), ("mlp", 2, "1f1b"), ("mlp", 2, "interleaved"), ("mlp", 4, "gpipe"),
         ("mlp", 1, "inprocess"), ("gpt", 2, "gpipe"), ("gpt", 1, "inprocess")]


@pytest.mark.slow
@pytest.mark.parametrize("model,nproc,schedule", CASES)
def test_pipeline_matches_single_device(pipeline_rows, model, nproc, schedule):
    (row,) = pipeline_rows[(model, nproc, schedule)]
    assert row["status"] == "ok", row["error"]
    assert row["parity_ok"], json.dumps({k: v for k, v in row.items() if k.startswith("parity")})
    facts = row["strategy_facts"]
    if schedule == "inprocess":
        assert facts["stage_devices"] == ["cpu", "cpu"] and row["devices"] == 1  # one CPU, said so
        assert "not parallelism" in facts["note"]
        return
    assert facts["stages"] == (4 if schedule == "interleaved" else 2)
    assert facts["dp"] == nproc // 2
    assert 0 < facts["bubble_fraction"] < 1
    if nproc == 4:
        # 2-D: the last stage of each replica holds its shard's loss
        assert [r["holds_loss"] for r in _rank_results(row)] == [False, True, False, True]


@pytest.mark.slow
def test_impossible_sweep_combinations_are_skipped(pipeline_rows):
    skipped = pipeline_rows.get(("mlp", 4, "skipped"), [])
    assert len(skipped) == 2 and all("pipeline.microbatches" in r["error"] for r in skipped)


def _rank_results(row: dict) -> list[dict]:
    ranks = sorted(Path(row["run_dir"]).glob("ranks/rank*.json"), key=lambda p: int(p.stem[4:]))
    return [json.loads(p.read_text()) for p in ranks]
