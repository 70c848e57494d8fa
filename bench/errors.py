"""The errors bench refuses bad input with, and the one format every refusal has.

`reject(key, expected, got, hint)` says what was expected, what was given and which key to change, in one line:
"key: expected X, got Y. Change `key=` on the command line". Every check of every command raises through it,
before any process starts; the command prints the line and exits 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run as given: one line for the user."""


class PlanError(ConfigError):
    """A plan that cannot be made as asked (`python -m bench.plan`, `bench.search`): one line for the user."""


def reject(key: str, expected: str, got, hint: str = "") -> None:
    """Raise the one error format bench uses for bad input."""
    raise ConfigError(f"{key}: expected {expected}, got {got!r}. Change `{key}=` on the command line{hint}.")


def value_at(cfg, key: str):
    """`cfg["a"]["b"]` for the dotted key "a.b"."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def integer_at_least(cfg, key: str, minimum: int) -> None:
    value = value_at(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        reject(key, "a positive integer" if minimum == 1 else f"an integer >= {minimum}", value)


def positive_int(cfg, key: str) -> None:
    integer_at_least(cfg, key, 1)
