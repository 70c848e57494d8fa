"""`python -m bench [overrides]`: the Hydra app that composes a benchmark and runs it.

Run mode appends the row to `<results_dir>/runs.jsonl`; multirun (`-m`) to the sweep folder's
`runs.jsonl`. The exit code is non-zero if any run failed or a config was rejected.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bench import controller
from bench.config import ConfigError
from bench.launch_env import prepare_argv


def _conf_dir() -> str:
    """The configs ship inside the wheel as bench/conf; in a checkout they are the repository's conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"bench's config folder is missing: looked in {here / 'conf'} and {here.parent / 'conf'}")


_exit_codes: list[int] = []


@hydra.main(version_base=None, config_path=_conf_dir(), config_name="config")
def _app(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        results_file = Path(hydra_cfg.sweep.dir).resolve() / "runs.jsonl"
    else:
        results_file = Path(cfg.results_dir).resolve() / "runs.jsonl"
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["results_dir"] = str(Path(plain["results_dir"]).resolve())
    overrides = list(hydra_cfg.overrides.task)
    try:
        plain = controller.prepare(plain)
    except ConfigError as exc:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # One combination of a sweep that cannot run must not end the sweep: record it and go on.
            print(f"bench: skipping {' '.join(overrides)}: {exc}", file=sys.stderr)
            controller.record_skipped(plain, run_dir, results_file, overrides, str(exc))
        else:
            print(f"bench: invalid config: {exc}", file=sys.stderr)
            _exit_codes.append(2)
        return
    row, outcome = controller.run(plain, run_dir, results_file, overrides)
    if row is None:  # launch=multinode/inline: the controller of global rank 0 records the row
        print(f"bench: {outcome.note}", file=sys.stderr)
        if outcome.status == "interrupted":
            sys.exit(128 + outcome.signal)
        _exit_codes.append(0 if outcome.status == "ok" else 1)
        return
    code = controller.report(row, results_file, outcome)
    if outcome.status == "interrupted":
        sys.exit(code)  # the user asked to stop: end the sweep too, after this run's row is written
    _exit_codes.append(code)


def main() -> None:
    # `--local-rank` (python -m torch.distributed.launch) out; multinode/inline run folders named after an id
    # every node shares
    sys.argv = prepare_argv(sys.argv, run_name="${strategy.name}_${model.name}")
    _app()
    sys.exit(max(_exit_codes, default=0))


if __name__ == "__main__":
    main()
