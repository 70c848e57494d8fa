"""Random command lines drawn from bench's config schema (hypothesis), mostly valid with one mistake now and then:
what tests/unit/test_fuzz.py checks in-process and tests/integration/test_fuzz_runs.py through `python -m bench`."""

from hypothesis import strategies as st

from bench import group_options
from bench.strategies import strategy_spec

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
