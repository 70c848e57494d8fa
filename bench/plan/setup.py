"""What a plan is made for, composed once: the training config `python -m bench` would run before a layout is
chosen, the planner's own keys (`plan.*`, and `search.*` for bench.search), each strategy's knobs, the network
and the device planned for."""

from __future__ import annotations

from dataclasses import dataclass

from bench import conf_dir
from bench.checks import resolve_device
from bench.errors import PlanError
from bench.models import model_label
from bench.parallel.topology import default_backend
from bench.plan.network import Network, NotMeasured, load_network
from bench.plan.throughput import single_run_overrides
from bench.strategies import strategy_names

PLANNER_SECTIONS = ("plan", "search")  # the planner's keys: never part of the runs it plans


@dataclass(frozen=True)
class Planning:
    """The inputs of one plan (`prepare_plan`), shared by `bench.plan`, `bench.plan.check` and `bench.search`."""

    base: dict  # the training config composed with the user's overrides (device resolved), before any layout
    plan: dict  # plan.*
    search: dict | None  # search.* (bench.search only)
    knobs: dict[str, dict]  # each planned strategy's own group, conf/strategy/<name>.yaml
    network: Network
    device_name: str
    peak_tflops: float | None  # the device's, at the run's precision (the MFU table's), unless peak_tflops= gives it
    single_run: tuple[str, ...] = ()  # the overrides of `python -m bench strategy=single` measuring this model


def compose(overrides: list[str], config_name: str = "plan") -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None, job_name=f"bench.{config_name}"):
        return OmegaConf.to_container(hydra_compose(config_name, overrides=overrides), resolve=True)


def strategy_knobs(name: str) -> dict:
    """A strategy's own keys as its config file sets them (the user's `strategy.*` overrides name one strategy,
    not all the plan compares: they apply to that one)."""
    import yaml

    return yaml.safe_load((conf_dir() / "strategy" / f"{name}.yaml").read_text())["strategy"]


def prepare_plan(overrides: list[str], config_name: str = "plan") -> Planning:
    """The plan's inputs; PlanError (or Hydra's own) for what cannot be planned."""
    from bench.measure.mfu import lookup_peak_tflops
    from bench.rank.runtime import device_name

    composed = compose(overrides, config_name)
    plan, search = composed["plan"], composed.get("search")
    device = (plan.get("networks") or {}).get(plan["network"], {}).get("device") or {}
    plan["device_name"] = plan["device_name"] or device.get("name")  # a preset's node: its GPU, unless told
    plan["device_memory_gb"] = plan["device_memory_gb"] or device.get("memory_gb")
    base = {k: v for k, v in composed.items() if k not in PLANNER_SECTIONS}
    names = plan["strategies"] or strategy_names()
    unknown = sorted(set(names) - set(strategy_names()))
    if unknown:
        raise PlanError(f"plan.strategies: expected some of {', '.join(strategy_names())}, got {unknown}. "
                        "Change `plan.strategies=` on the command line.")
    base["device"] = resolve_device(base["device"])
    backend = default_backend(base["device"]) if base["backend"] == "auto" else base["backend"]
    name = plan["device_name"] or device_name(base["device"])
    try:
        network = load_network(plan, base["results_dir"], name, backend)
    except NotMeasured as exc:  # memory is planned all the same; the table says why step time is not
        worlds = plan["world_sizes"] or [base["launch"]["nproc"]]
        network = Network("not measured", str(exc), plan["gpus_per_node"] or max(worlds), intra={},
                          measured=False)  # every rank on this machine, unless told how many a node holds
    per_rank_memory_mb(plan, 1)  # refuses a device named without its memory
    for name, sets in (plan["variants"] or {}).items():
        wrong = [k for knobs in sets or [] for k in (knobs or {}) if k not in strategy_knobs(name)] \
            if name in strategy_names() else [name]
        if wrong or not isinstance(sets, list) or not all(isinstance(knobs, dict) for knobs in sets):
            raise PlanError(f"plan.variants: expected {{strategy: [{{its knob: value, ...}}, ...]}} with the knobs "
                            f"of conf/strategy/<strategy>.yaml, got {name}: {sets!r}. Change `plan.variants=` on "
                            "the command line.")
    for key, what in (("cp", "context"), ("ep", "expert")):
        values = plan.get(key) or [1]
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                   for v in values):
            raise PlanError(f"plan.{key}: expected a list of {what}-parallel degrees ([1, 2, 4]), got {values!r}. "
                            f"Change `plan.{key}=` on the command line.")
    load = plan.get("expert_load", 1.0)
    if isinstance(load, bool) or not isinstance(load, (int, float)) or not 1 <= load < float("inf"):
        raise PlanError(f"plan.expert_load: expected the busiest rank's tokens over the mean, a number >= 1 (1: an "
                        f"even router), got {load!r}. Change `plan.expert_load=` on the command line.")
    workers = plan["workers"]
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise PlanError(f"plan.workers: expected a number of processes (1: every simulation in this one) or null "
                        f"(this machine's cores), got {workers!r}. Change `plan.workers=` on the command line.")
    peak = base["peak_tflops"] if isinstance(base["peak_tflops"], (int, float)) else \
        lookup_peak_tflops(name, base["precision"])
    # the strategy the command line chose (`strategy=pipeline strategy.microbatch_size=2`) with its overrides
    knobs = {strategy: dict(base["strategy"]) if base["strategy"]["name"] == strategy else strategy_knobs(strategy)
             for strategy in names}
    single = single_run_overrides(overrides, model_label(base["model"]))
    return Planning(base, plan, search, knobs, network, name, peak, single)


def per_rank_memory_mb(plan: dict, world: int) -> tuple[float, str]:
    """What one rank may hold: `plan.device_memory_gb`, else this machine's (its GPU's, or its available memory
    shared by `world` ranks)."""
    from bench.plan.memory import rank_memory_mb

    if plan["device_memory_gb"] is not None:
        return plan["device_memory_gb"] * 1024, "plan.device_memory_gb"
    if plan["device_name"]:
        raise PlanError(f"plan.device_memory_gb: expected the memory of a {plan['device_name']} in GB, got null. "
                        "Set `plan.device_memory_gb=` on the command line.")
    import torch

    return rank_memory_mb("cuda" if torch.cuda.is_available() else "cpu", world)
