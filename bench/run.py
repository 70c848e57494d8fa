"""A training run, resolved once: the composed config checked, pinned and frozen, with everything derived from it.

`prepare(cfg)` checks the config Hydra composed (`bench.checks`: one line and exit 2 for the first problem),
pins what every rank must agree on (the device, the parallel degrees with -1 inferred) and returns a `Run`: the
frozen config and the specs of its model, strategy and launcher, read once. The controller consumes it, the
ranks read it back from their run folder (`Run.load`), the planner and the search derive their layouts from it
(`Run.replace`), so a run's world size, degrees and specs are computed in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.checks import pin_device, validate
from bench.configs import FrozenDict, freeze, thaw
from bench.launch import LauncherSpec, launcher_spec
from bench.models import ModelSpec, model_spec
from bench.parallel.topology import Degrees, parallel_degrees
from bench.runfolder import read_config, write_config
from bench.strategies import StrategySpec, strategy_spec


@dataclass(frozen=True)
class Run:
    """A resolved training run. `config` is the config as the ranks read it (frozen: derive another run with
    `replace`); the rest is read from it once."""

    config: FrozenDict
    degrees: Degrees
    model: ModelSpec
    strategy: StrategySpec
    launcher: LauncherSpec

    @classmethod
    def of(cls, config) -> Run:
        """The run of a config already checked and pinned (its degrees resolved, its device too)."""
        frozen = freeze(config)
        return cls(frozen, Degrees(**parallel_degrees(frozen)), model_spec(frozen["model"]),
                   strategy_spec(frozen["strategy"]["name"]), launcher_spec(frozen["launch"]["name"]))

    @classmethod
    def load(cls, run_dir: Path) -> Run:
        """The run whose config the controller wrote into `run_dir` (what a rank reads first)."""
        return cls.of(read_config(run_dir))

    def save(self, run_dir: Path) -> None:
        write_config(self.config, run_dir)

    def replace(self, **changes) -> Run:
        """This run with top-level keys (whole sections) replaced: an unchecked derivation, for the planner's
        layouts and simulations; `prepare` checks a config a user gave."""
        return Run.of({**thaw(self.config), **thaw(changes)})

    @property
    def world_size(self) -> int:
        return self.degrees.world

    @property
    def nnodes(self) -> int:
        return self.config["launch"]["nnodes"]

    @property
    def nproc(self) -> int:
        return self.config["launch"]["nproc"]

    @property
    def device(self) -> str:
        return self.config["device"]

    def materialize(self, module, device):
        """Allocate and fill this rank's parameters of `module` (the model or a stage of it) on `device`, as
        bench's init rule draws them from the run's seed: see `bench.models.init`."""
        from bench.models.init import materialize

        return materialize(module, device, self.config["seed"], self.model.init_std)


def prepare(cfg: dict) -> Run:
    """Check the composed config (`bench.errors.ConfigError`, one line, for the first problem), then pin what
    every rank must agree on: the device (`auto` resolved), the parallel degrees (-1 inferred)."""
    validate(cfg)
    pin_device(cfg)
    cfg["parallel"] = parallel_degrees(cfg)
    return Run.of(cfg)
