"""The errors bench refuses bad input with, and the one format every refusal has.

`reject(key, expected, got, hint)` says what was expected, what was given and which key to change, in one line:
"key: expected X, got Y. Change `key=` on the command line". Every check of every command raises through it,
before any process starts; the command prints the line and exits 2.
"""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A config that cannot run as given: one line for the user."""


class PlanError(ConfigError):
    """A plan that cannot be made as asked (`python -m bench.plan`, `bench.search`): one line for the user."""


def reject(key: str, expected: str, got, hint: str = "") -> None:
    """Raise the one error format bench uses for bad input."""
    raise ConfigError(f"{key}: expected {expected}, got {shown(got)}. Change `{key}=` on the command line{hint}.")


def shown(value, most: int = 200) -> str:
    """`repr(value)`, cut to its start and its length past `most` characters: a 5,000-character value would
    bury the line's point."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4,300-digit limit on int-to-str conversions
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= most else f"{text[:most // 2]}... ({len(text)} characters)"


def value_at(cfg, key: str):
    """`cfg["a"]["b"]` for the dotted key "a.b"."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def is_integer(value) -> bool:
    """An int and not a bool: YAML reads `warmup=true` as True, and Python's bool is an int (True == 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """An int or a finite float, not a bool: Hydra reads `inf`, `nan` and `1e400` as floats (inf, nan, inf)."""
    if is_integer(value):
        return True  # math.isfinite would raise OverflowError on an int past a float's range: ints are finite
    return isinstance(value, float) and math.isfinite(value)


def positive_number(value, most: float = math.inf) -> bool:
    """A finite number in (0, most]: not a bool, not nan or inf."""
    return is_finite_number(value) and 0 < value <= most


def integer_at_least(cfg, key: str, minimum: int) -> None:
    value = value_at(cfg, key)
    if not is_integer(value) or value < minimum:
        reject(key, "a positive integer" if minimum == 1 else f"an integer >= {minimum}", value)


def positive_int(cfg, key: str) -> None:
    integer_at_least(cfg, key, 1)
