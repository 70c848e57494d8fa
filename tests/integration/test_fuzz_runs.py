"""Random command lines drawn from the config's schema (hypothesis): every one is either refused before anything
starts, with one line, or accepted, and an accepted one runs. In-process for many cases (the checks, then a
forward and backward of the model it builds); through `python -m bench` for a few, as a user runs it."""

import contextlib
import io
import subprocess
import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bench.__main__ as bench_main
from bench import app, group_options
from bench.checks import validate
from bench.errors import ConfigError
from bench.models import build_model, loss_fn, model_spec
from bench.parallel.topology import parallel_degrees
from bench.strategies import strategy_spec
from conftest import REPO, compose_plain, read_rows

SIZES = {  # a model's size keys: a valid range, and values beyond it
    "mlp": {"in_features": (1, 24), "hidden": (1, 24), "layers": (1, 3), "classes": (1, 6)},
    "gpt": {"vocab_size": (1, 40), "seq_len": (1, 12), "d_model": (1, 24), "n_layers": (1, 3), "n_heads": (1, 4),
            "mlp_ratio": (1, 2)},
    "cnn": {"image_size": (1, 8), "in_channels": (1, 3), "width": (1, 8), "blocks": (1, 2), "classes": (1, 4),
            "groups": (1, 4)},
}


@st.composite
def mostly(draw, valid, invalid):
    """A valid value most of the time: a command line with one mistake in it is the case worth testing. (The
    rarer branch is the larger integer: hypothesis leans towards small ones.)"""
    return draw(invalid if draw(st.integers(0, 9)) == 9 else valid)


@st.composite
def command_lines(draw) -> list[str]:
    model = draw(st.sampled_from(["mlp", "gpt", "cnn"]))
    pick = lambda valid, invalid: draw(mostly(valid, invalid))  # noqa: E731
    strategy = pick(st.sampled_from(group_options("strategy")), st.just("nope"))
    one_process = strategy != "nope" and strategy_spec(strategy).single_process
    args = [
        f"strategy={strategy}",
        f"model={model}",
        f"launch.nproc={pick(st.just(1) if one_process else st.integers(1, 4), st.integers(-1, 4))}",
        f"steps={pick(st.integers(3, 6), st.integers(-1, 0))}",
        f"warmup={pick(st.integers(0, 2), st.integers(-1, 8))}",
        f"global_batch={pick(st.sampled_from([8, 12, 16, 24]), st.integers(-1, 7))}",
        f"precision={pick(st.sampled_from(['fp32', 'bf16']), st.sampled_from(['fp16', 'fp8']))}",
        f"grad_accum={pick(st.integers(1, 2), st.integers(0, 3))}",
        f"optim.name={pick(st.sampled_from(['sgd', 'adamw']), st.just('lion'))}",
        f"optim.lr={pick(st.just(0.01), st.sampled_from([0, -1]))}",
        f"peak_tflops={pick(st.sampled_from(['null', '2.5']), st.sampled_from(['-1', 'fast']))}",
    ]
    for key, (low, high) in SIZES[model].items():
        if draw(st.booleans()):
            args.append(f"model.{key}={pick(st.integers(low, high), st.integers(-1, 0))}")
    for degree in ("dp", "tp", "pp"):
        if draw(st.integers(0, 3)) == 3:
            args.append(f"parallel.{degree}={draw(st.integers(-2, 3))}")
    if draw(st.integers(0, 9)) == 9:
        args.append(draw(st.sampled_from(["stepz=3", "model.widthh=2", "optim=sgd", "launch=nope"])))
    return args


def front_door(args: list[str]) -> tuple[str, object]:
    """What `python -m bench` does before starting anything: ("refused", the message) or ("accepted", config)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            app.refuse_what_hydra_cannot_compose(bench_main.COMMAND, args)
        except SystemExit as exc:
            assert exc.code == 2
            return "refused", stderr.getvalue()
    cfg = compose_plain(*args)
    try:
        validate(cfg)
    except ConfigError as exc:
        return "refused", f"bench: invalid config: {exc}\n"
    return "accepted", cfg


def dry_run(cfg: dict) -> None:
    """One forward and backward of the model the config builds, on one replica's micro-batch."""
    dp = parallel_degrees(cfg)["dp"]
    micro = cfg["global_batch"] // dp // cfg["grad_accum"]
    model = build_model(cfg["model"])
    x, y = model_spec(cfg["model"]).synthetic_batch(cfg["model"], micro, torch.Generator().manual_seed(0))
    loss_fn(model(x), y).backward()


CASES = {"refused": 0, "accepted": 0}


@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(command_lines())
def test_through_python_dash_m_bench_a_config_error_is_never_a_failed_row(tmp_path_factory, args):
    results = tmp_path_factory.mktemp("fuzz")
    proc = subprocess.run([sys.executable, "-m", "bench", f"results_dir={results}", "progress=false", *args,
                           "timeout_s=120"], capture_output=True, text=True, cwd=REPO, timeout=300)
    rows = read_rows(results / "runs.jsonl") if (results / "runs.jsonl").exists() else []
    if proc.returncode == 2:
        assert len(proc.stderr.strip().splitlines()) == 1 and not rows, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert rows and all(r["status"] == "ok" for r in rows)
