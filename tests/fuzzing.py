"""Random command lines drawn from bench's config schema (hypothesis), mostly valid with one mistake now and then:
what tests/unit/test_fuzz.py checks in-process and tests/integration/test_fuzz_runs.py through `python -m bench`.
Also valid lines with one hostile override last (`hostile_command_lines`): a deleted key, an empty, non-finite,
huge, path-like or boolean value, a key too long for a file name, or a value at a bound."""

import yaml
from hypothesis import strategies as st

from bench import conf_dir, group_options
from bench.configs import flatten
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


# ------------------------------------------------------------------------------- hostile command-line shapes


def primary_keys() -> set[str]:
    """The keys conf/config.yaml sets itself, sections too (`~fault` deletes one)."""
    body = {k: v for k, v in yaml.safe_load((conf_dir() / "config.yaml").read_text()).items()
            if k not in ("defaults", "hydra")}
    dotted = set(flatten(body))
    return dotted | {key.rsplit(".", 1)[0] for key in dotted if "." in key}


# Keys a command line can name: the primary config's, the groups' names, and each group's own for the fuzzed
# models (a key another model has, e.g. model.hidden with model=gpt, is a mistake Hydra refuses, also worth
# drawing).
KEYS = sorted({*primary_keys(), *(f"{group}.name" for group in ("strategy", "model", "data", "launch")),
               *(f"model.{key}" for sizes in SIZES.values() for key in sizes), "model", "launch.omp_num_threads",
               "launch.rdzv_timeout_s", "launch.teardown_grace_s", "data.num_batches"})
# Values that once got past the checks somewhere: each must be refused in one line, or be fine
HOSTILE_VALUES = {
    "empty": [""],
    "non-finite": ["inf", "-inf", "nan", "1e400"],
    "huge": [str(2**63), str(2**64), str(10**30), str(-(2**63) - 1), "1" + "0" * 5000],
    "path": ["../../..", "/", "a/b", "..", "x" * 300, "/tmp/../.."],
    "bool": ["true", "false"],
}
LONG_KEY = "k" * 5000
# The bounds themselves, and values of a key that is off: each of these validates
EDGES = ["timeout_s=1000000000", "memory_limit_gb=1000000000", "flight_recorder_entries=100000",
         "seed=9223372036854775807", "fault.step=1000000", "optim.lr=1e30", "results_dir=/tmp/a/../b",
         "memory_limit_gb=null", "peak_tflops=1e-300"]
SHAPES = ("delete", "long key", "edge", *HOSTILE_VALUES)
# One of each shape on a valid line, always tried (hypothesis' `example`) before the drawn ones
SHAPE_EXAMPLES = ["~steps", f"+{LONG_KEY}=1", "seed=9223372036854775807", "results_dir=", "optim.lr=nan",
                  f"seed={2**64}", "model.name=../../..", "warmup=true"]
VALID_LINE = ["strategy=ddp", "launch.nproc=2", "model=mlp", "steps=4", "warmup=1", "global_batch=8"]


@st.composite
def hostile_override(draw) -> str:
    """One override of a shape the schema-driven lines never draw: a deletion, an empty, non-finite, huge,
    path-like or boolean value for any key, a key too long for a file name, or a value at a bound (`EDGES`)."""
    shape = draw(st.sampled_from(SHAPES))
    key = draw(st.sampled_from(KEYS))
    if shape == "edge":
        return draw(st.sampled_from(EDGES))
    if shape == "delete":
        return f"~{key}"
    if shape == "long key":
        return draw(st.sampled_from([f"{LONG_KEY}=1", f"+{LONG_KEY}=1", f"model.{LONG_KEY}=1"]))
    return f"{key}={draw(st.sampled_from(HOSTILE_VALUES[shape]))}"


@st.composite
def valid_command_lines(draw) -> list[str]:
    """A command line that validates: whatever is refused after a hostile override is refused for that."""
    nproc = draw(st.integers(1, 2))
    return [f"strategy={'single' if nproc == 1 else 'ddp'}", f"launch.nproc={nproc}",
            f"model={draw(st.sampled_from(sorted(SIZES)))}", f"steps={draw(st.integers(3, 6))}",
            f"warmup={draw(st.integers(0, 2))}", f"global_batch={draw(st.sampled_from([8, 16]))}"]


@st.composite
def hostile_command_lines(draw) -> list[str]:
    """A valid command line, then one hostile override (Hydra applies overrides in order: the hostile one has the
    last word on its key)."""
    return [*draw(valid_command_lines()), draw(hostile_override())]


def shape_of(override: str) -> str:
    """Which kind of `hostile_override` this is."""
    key, _, value = override.partition("=")
    if key.startswith("~"):
        return "delete"
    if len(key) > 1000:
        return "long key"
    if override in EDGES:
        return "edge"
    return next(kind for kind, values in HOSTILE_VALUES.items() if value in values)
