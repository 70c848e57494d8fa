"""Resolved configs as values: frozen once resolved, and one definition of "the same configuration".

Two runs ran the same configuration when their resolved configs agree on every key except the run-specific
ones (`RUN_SPECIFIC_KEYS`: where results go, the progress bar, guards that only matter when they fire, the
index of a repeat, what bench.plan predicted). That one definition pools repeats in `bench.report`, finds the
runs `bench.plan` calibrates and checks against, and the runs `bench.search` resumes from. A caller that lets
more vary says which keys, by name (`ignoring`): a plan looks for the runs of a model at other layouts
(`LAYOUT_KEYS`) whatever their length (`LENGTH_KEYS`).

No torch here: `python -m bench.report` reads results without it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

# Config keys that do not change what a run measures: where results go, the progress bar, guards that only matter
# when they fire, the index of a repeat (`+repeat=0,1,2`, `+trial=...`, `repeats=N`), what the plan predicted.
RUN_SPECIFIC_KEYS = frozenset(
    {"results_dir", "progress", "timeout_s", "launch.rdzv_timeout_s", "repeat", "repeats", "trial",
     "launch.rdzv_id", "launch.rdzv_endpoint",  # a multi-node job's id (new for every run) and meeting place
     "force",  # the memory check before a run
     "flight_recorder_entries",  # what a rank remembers for a hang's dump
     "predicted_step_time_ms",  # what bench.plan predicted, kept beside the measurement
     "profile.enabled", "profile.steps", "profile.memory"}  # profiling runs after the timed steps
)
# Where a layout is, and its batch: what a plan varies (a key ending in "." names its whole section).
LAYOUT_KEYS = ("launch.nnodes", "launch.nproc", "parallel.", "global_batch")
# How long a run lasts and what it checks on the side, not how fast its steps run.
LENGTH_KEYS = ("steps", "warmup", "seed", "verify", "peak_tflops")


# ------------------------------------------------------------------------------------------- frozen values


class FrozenDict(dict):
    """A dict that refuses changes: a resolved config every reader shares. JSON writes it as a plain object;
    `copy.deepcopy` and `thaw` give a plain, mutable copy."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a resolved config is frozen: derive a new one (bench.run.Run.replace, or thaw() a copy)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __deepcopy__(self, memo) -> dict:
        return thaw(self)

    def __reduce__(self):
        return dict, (thaw(self),)


class FrozenList(list):
    """A list that refuses changes (a frozen config's lists); equal to the plain list it holds."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a resolved config is frozen: derive a new one (bench.run.Run.replace, or thaw() a copy)")

    __setitem__ = __delitem__ = append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __iadd__ = __imul__ = _refuse

    def __deepcopy__(self, memo) -> list:
        return thaw(self)

    def __reduce__(self):
        return list, (thaw(self),)


def freeze(value):
    """`value` with every dict and list in it frozen."""
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return FrozenList(freeze(v) for v in value)
    return value


def thaw(value):
    """A plain, mutable deep copy of `value`."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value


# ------------------------------------------------------------------------------------ the same configuration


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _ignored(key: str, ignoring: Iterable[str]) -> bool:
    return key in RUN_SPECIFIC_KEYS or any(key == k or (k.endswith(".") and key.startswith(k)) for k in ignoring)


def configuration(config: Mapping | None, ignoring: Iterable[str] = ()) -> dict:
    """The config's dotted items that define what a run measures: run-specific keys and `ignoring` left out (a
    name ending in "." leaves out its whole section)."""
    ignoring = tuple(ignoring)
    return {k: v for k, v in flatten(config or {}).items() if not _ignored(k, ignoring)}


def digest(items: Mapping) -> str:
    """A short stable id for a set of config items."""
    return hashlib.sha1(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:10]


def configuration_id(config: Mapping | None, ignoring: Iterable[str] = ()) -> str:
    """Same id <=> the same configuration (`configuration`)."""
    return digest(configuration(config, ignoring))


def same_configuration(a: Mapping | None, b: Mapping | None, ignoring: Iterable[str] = ()) -> bool:
    """Whether two resolved configs are the same configuration, `ignoring` those keys too."""
    ignoring = tuple(ignoring)
    return configuration(a, ignoring) == configuration(b, ignoring)
