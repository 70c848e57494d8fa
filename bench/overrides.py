"""The command line checked before Hydra runs anything: an override Hydra cannot compose, and a composed job
bench cannot take before Hydra makes its run folder from it, are one line and exit 2 (Hydra itself prints
several lines and exits 1, or makes the folder first). `bench.app` calls these before Hydra starts."""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from bench import conf_dir
from bench.errors import ConfigError


def refuse_what_hydra_cannot_compose(name: str, config_name: str, args: list[str]) -> None:
    """A key that does not exist, an option a group does not have, an override that does not parse: one line
    and exit 2 before anything runs, as for every other bad value (Hydra itself prints several lines and exits
    1). Each value a sweep takes is composed once; Hydra still checks the whole sweep before it starts a job.
    Commands with other flags (--help, --cfg, --info...) are Hydra's own."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return
    overrides = [a for a in args if not a.startswith("-")]
    # Hydra's own config only where an override reaches into it: composing it too takes 2.5 times as long
    with_hydra = any(o.lstrip("+~").startswith("hydra") for o in overrides)
    try:
        jobs = one_job_per_swept_value(OverridesParser.create().parse_overrides(overrides))
        refuse_options_not_in_their_group(jobs)
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None, job_name=name):
            for job in jobs:
                composed = compose(config_name, overrides=job, return_hydra_config=with_hydra)
                refuse_bad_shape(name, config_name, composed)
    except (OverrideParseException, ValueError) as exc:  # ValueError: an int past Python's 4,300 digits
        bad = next((o for o in overrides if not _parses(o)), "")
        key, _, value = bad.partition("=")
        refuse(shortened(key.lstrip("+~")) or "overrides", f"key=value in Hydra's override grammar "
               f"({shortened(str(exc).splitlines()[0], 120)}), got {shortened(bad)!r}")
    except MissingConfigException as exc:
        group, _, option = (exc.missing_cfg_file or "").rpartition("/")
        key = next((o.split("=", 1)[0] for o in overrides if o.lstrip("+~").split("=", 1)[0] == group), group)
        refuse(key, f"one of {', '.join(exc.options or [])}, got {option!r}")
    except HydraException as exc:
        key, _, value = next((o for o in overrides if _names_key_of(o, str(exc))), "=").partition("=")
        if key and str(exc).startswith("Could not override"):
            refuse(key, f"a key of bench's config (`python -m {name} --cfg job` lists them; +{key}=... adds "
                   f"one), got {key}={value}")
        first = str(exc).strip().splitlines()[0]
        print(f"{name}: invalid config: {first}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # Hydra looks a key up as a config group's file: a 5,000-character one, ENAMETOOLONG
        key = max(overrides, key=len).split("=", 1)[0].lstrip("+~")
        refuse(shortened(key), f"a key of bench's config (`python -m {name} --cfg job` lists them), got one "
               f"of {len(key)} characters ({exc.strerror})")


def refuse_options_not_in_their_group(jobs: list[list[str]]) -> None:
    """A group's option is one of its files. Hydra also takes a path: `model=../strategy/ddp` composed a strategy
    as the model, and `model=../../..` was refused naming the folder Hydra looked in (`model/../..`), not the
    key. Sweeps: each value (`one_job_per_swept_value`)."""
    from bench import group_options

    groups = {path.name for path in conf_dir().iterdir() if path.is_dir()}
    for job in jobs:
        for override in job:
            key, _, option = override.partition("=")
            group = key.lstrip("+").split("@")[0]
            if group in groups and not key.startswith("~") and option not in group_options(group):
                refuse(key, f"one of {', '.join(group_options(group))}, got {shortened(option)!r}")


def shortened(text: str, most: int = 60) -> str:
    """`text`, or its start and its length where it is longer than `most` characters (a refusal stays readable)."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters)"


def refuse_bad_shape(name: str, config_name: str, job) -> None:
    """A composed job whose keys bench cannot take before Hydra makes its run folder from them: a deleted key,
    an unknown name (a folder name too), an empty results_dir (`bench.checks_shape`). One line and exit 2."""
    from omegaconf.errors import OmegaConfBaseException

    from bench.checks_shape import check_shape

    job = OmegaConf.masked_copy(job, [key for key in job if key != "hydra"])  # Hydra's own node is Hydra's
    unresolved = None
    try:
        plain = OmegaConf.to_container(job, resolve=True)
    except OmegaConfBaseException as exc:  # e.g. data.dir's `${results_dir}` after `~results_dir`: named below
        plain, unresolved = OmegaConf.to_container(job, resolve=False), exc
    try:
        check_shape(plain, config_name)
    except ConfigError as exc:
        print(f"{name}: invalid config: {exc}", file=sys.stderr)
        sys.exit(2)
    if unresolved is not None:
        first = str(unresolved).strip().splitlines()[0]
        refuse(getattr(unresolved, "full_key", None) or "overrides", f"a value that resolves, got {first!r}")


def _parses(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_override(override)
    except Exception:
        return False
    return True


def _names_key_of(override: str, message: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return f"'{key}'" in message


def one_job_per_swept_value(parsed) -> list[list[str]]:
    """Override sets that take every value of every swept key at least once (each sweep in turn, the others at
    their first value): enough to find an unknown key or option without composing the whole product."""
    plain, sweeps = [], []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override() and override.is_discrete_sweep():
            try:
                sweeps.append([f"{key}={value}" for value in override.sweep_string_iterator()])
            except Exception:  # glob(*) needs the config loader: its options exist by construction
                continue
        else:
            plain.append(f"{key}={override.get_value_element_as_str()}")
    if not sweeps:
        return [plain]
    firsts = [values[0] for values in sweeps]
    jobs = []
    for i, values in enumerate(sweeps):
        for value in values:
            jobs.append(plain + firsts[:i] + [value] + firsts[i + 1:])
    return jobs


def refuse(key: str, expected: str, hint: str = "") -> None:
    print(f"bench: invalid config: {key}: expected {expected}. Change `{key}=` on the command line{hint}.",
          file=sys.stderr)
    sys.exit(2)
