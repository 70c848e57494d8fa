"""Random command lines drawn from the config's schema (hypothesis): every one is either refused before anything
starts, with one line, or accepted, and an accepted one runs. In-process for many cases (the checks, then a
forward and backward of the model it builds); through `python -m bench` for a few, as a user runs it."""

import contextlib
import io

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings

import bench.__main__ as bench_main
import fuzzing
from bench.checks import validate
from bench.errors import ConfigError
from bench.models import build_model, loss_fn, model_spec
from bench.overrides import refuse_what_hydra_cannot_compose
from bench.parallel.topology import parallel_degrees
from conftest import compose_plain
from fuzzing import EDGES, SHAPE_EXAMPLES, VALID_LINE, command_lines, hostile_command_lines, shape_of


def front_door(args: list[str]) -> tuple[str, object]:
    """What `python -m bench` does before starting anything: ("refused", the message) or ("accepted", config)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            refuse_what_hydra_cannot_compose(bench_main.COMMAND.name, bench_main.COMMAND.config_name, args)
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
# the property and the count that follows it run on one pytest-xdist worker, in this order
pytestmark = pytest.mark.xdist_group("fuzz")


# derandomize: the same command lines on every run, so a failure here is never a matter of luck
@settings(max_examples=24, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(command_lines())
def test_every_command_line_is_refused_in_one_line_or_runs(args):
    outcome, value = front_door(args)
    CASES[outcome] += 1
    if outcome == "refused":
        assert value.count("\n") == 1 and value.startswith("bench: invalid config: "), value
        assert "Traceback" not in value
    else:
        dry_run(value)


def test_the_fuzz_ran_both_kinds_of_case():
    """Runs after the property (pytest keeps file order): both outcomes were met, often."""
    print(f"fuzz: {sum(CASES.values())} command lines, {CASES['refused']} refused, {CASES['accepted']} accepted")
    assert CASES["refused"] >= 6 and CASES["accepted"] >= 3, CASES


HOSTILE = {"refused": 0, "accepted": 0}
SHAPES_SEEN: set[str] = set()


def with_one_of_each_shape(test):
    for override in SHAPE_EXAMPLES:
        test = example([*VALID_LINE, override])(test)
    return test


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(hostile_command_lines())
@with_one_of_each_shape
def test_a_hostile_override_is_refused_in_one_line_or_validates(args):
    """`~key`, an empty value, inf/nan, a huge int, a path for a name, a bool for an int, a 5,000-character key:
    never a traceback (a model this large is valid and left to the memory check, so nothing is built here)."""
    outcome, value = front_door(args)
    HOSTILE[outcome] += 1
    SHAPES_SEEN.add(shape_of(args[-1]))
    if outcome == "refused":
        assert value.count("\n") == 1 and value.startswith("bench: invalid config: "), value
        assert len(value) < 1000, "a long key or value is shortened"
    assert outcome == "accepted" or args[-1] not in EDGES, f"a bound is a valid value: {value}"


def test_the_hostile_fuzz_ran_both_kinds_of_case():
    print(f"hostile fuzz: {sum(HOSTILE.values())} command lines, {HOSTILE['refused']} refused, "
          f"{HOSTILE['accepted']} accepted; shapes: {', '.join(sorted(SHAPES_SEEN))}")
    assert HOSTILE["refused"] >= 10 and HOSTILE["accepted"] >= 2, HOSTILE
    assert SHAPES_SEEN == set(fuzzing.SHAPES), SHAPES_SEEN


@pytest.mark.parametrize("edge", EDGES)
def test_every_bound_validates(edge):
    """What the hostile fuzz draws as a bound (`fuzzing.EDGES`), each on one valid line: accepted."""
    outcome, value = front_door([*VALID_LINE, edge])
    assert outcome == "accepted", value
