"""The config's shape: every key bench reads is there, each group's `name` names one of its options, and
results_dir names a folder. Checked twice: by the app on every composed job before Hydra makes any folder
(`bench.overrides.refuse_what_hydra_cannot_compose`), since the run folder is built from `${results_dir}` and the
groups' names (`hydra.run.dir` in conf/config.yaml), and by `bench.checks.validate`. No torch here: the app
runs these before torch loads.

Why each (all seen through `python -m bench`): `~steps` deleted a key every run reads, a KeyError traceback in the
controller; with `model.name=../../..` the run folder `<results_dir>/<date>/<time>_single_../../..` was
<results_dir> itself, where Hydra wrote its .hydra/ (one `..` more leaves results_dir), and `model.name=foo` was a
ModuleNotFoundError traceback after that folder was made; `results_dir=` (empty) made the run folder at the
filesystem root (`${results_dir}/<date>/...` is `/<date>/...`) and runs.jsonl in the current folder, exit 0.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import yaml

from bench import conf_dir, group_options
from bench.errors import reject


class Deleted:
    """What a deleted key is shown as in a refusal: `got nothing (~steps deleted it)`."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"nothing (~{self.key} deleted it)"


@functools.cache
def _conf_file(relative: str) -> dict:
    path = conf_dir() / relative
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


@functools.cache
def _is_global(group: str, option: str) -> bool:
    """A `# @package _global_` option (a strategy's file) nests its keys under `<group>:` itself."""
    return (conf_dir() / group / f"{option}.yaml").read_text().startswith("# @package _global_")


def _section(group: str, option: str) -> dict:
    """An option file's own keys, under `<group>.` in the composed config."""
    body = _conf_file(f"{group}/{option}.yaml")
    return (body.get(group) or {}) if _is_global(group, option) else body


@functools.cache
def group_names(group: str) -> tuple[str, ...]:
    """The `name` of each option of a group (a preset shares its module's: llama3-8b.yaml is name: hf)."""
    return tuple(sorted({str(_section(group, option).get("name")) for option in group_options(group)}))


def _keys(node: Mapping, prefix: str = "") -> list[str]:
    """Every dotted key of a yaml mapping, a section before its keys (`~fault` is named as `fault`)."""
    keys = []
    for key, value in node.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            keys += _keys(value, f"{prefix}{key}.")
    return keys


def chosen_groups(config_name: str) -> list[str]:
    """The groups a primary config's defaults list chooses (conf/config.yaml: strategy, model, data, launch)."""
    defaults = _conf_file(f"{config_name}.yaml").get("defaults") or []
    return [next(iter(entry)) for entry in defaults if isinstance(entry, Mapping)]


def required_keys(config_name: str) -> list[str]:
    """The keys of the primary config file, to their leaves (all read by the controller or the ranks), but its
    hydra node; each chosen group's section and its name."""
    body = {k: v for k, v in _conf_file(f"{config_name}.yaml").items() if k not in ("defaults", "hydra")}
    return [*chosen_groups(config_name), *(f"{group}.name" for group in chosen_groups(config_name)), *_keys(body)]


def group_keys(cfg: Mapping, group: str) -> list[str]:
    """The keys the chosen option of a group defines itself, one level down: a nested mapping's entries (an hf
    model's `config`, a custom model's `module`) are keyword arguments, where one left out takes the library's
    default."""
    return [f"{group}.{key}" for key in _section(group, cfg[group]["name"])]


def _deleted(cfg: Mapping, key: str) -> bool:
    """Whether `key` is missing from its section. A section replaced by a value (`optim=sgd`, `profile=yes`) is
    not a deletion: the sections check says what it should be (`bench.checks.check_sections`)."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping):
            return False
        if part not in node:
            return True
        node = node[part]
    return False


def check_present(cfg: Mapping, keys: list[str]) -> None:
    for key in keys:
        if _deleted(cfg, key):
            reject(key, "a value (bench reads every key of its config: set it instead of deleting it)", Deleted(key))


def check_group_name(cfg: Mapping, group: str) -> None:
    """The name is a module to import and a part of the run folder's name: one of the group's own."""
    name, known = cfg[group]["name"], group_names(group)
    if not isinstance(name, str) or name not in known:
        reject(f"{group}.name", f"one of {', '.join(known)} (choose one with {group}=<option>)", name)


def check_results_dir(cfg: Mapping) -> None:
    folder = cfg["results_dir"]
    if not isinstance(folder, str) or not folder.strip():
        reject("results_dir", "a folder (a non-empty path, relative to where bench is started)", folder)


def check_shape(cfg: Mapping, config_name: str = "config") -> None:
    """Every check above, in order: a deleted key, then names (before a group's own keys are looked up by its
    name), then results_dir."""
    if not _conf_file(f"{config_name}.yaml"):
        return  # a primary config of the user's own (--config-dir): its keys are not bench's to require
    check_present(cfg, required_keys(config_name))
    for group in chosen_groups(config_name):
        if not isinstance(cfg[group], Mapping):
            continue  # replaced by a value: the sections check names it (bench.checks.check_sections)
        check_group_name(cfg, group)
        check_present(cfg, group_keys(cfg, group))
    check_results_dir(cfg)
