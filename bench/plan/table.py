"""The plan: every layout of every strategy at every world size (`bench.plan.layouts`), with its memory per rank
(`bench.plan.memory`) and step time (`bench.plan.calibration`) predicted, ranked: those that fit first, then by
world size and predicted throughput per device. `make_plan` is the library entry; `plan_table` gives it as the
table `python -m bench.plan` prints and writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from bench.plan.bound import floor_mb
from bench.plan.calibration import StepTimeModel
from bench.plan.depth import simulated_at_depths
from bench.plan.fitting import MOST_WORKERS, Simulations
from bench.plan.layouts import Layout, candidates
from bench.plan.setup import Planning, per_rank_memory_mb
from bench.plan.throughput import machine_cores
from bench.run import Run

MEMORY_KINDS = ("params", "grads", "optim", "activations", "temp")
STATUS_ORDER = {"fits": 0, "does not fit": 1, "slower": 2, "not predicted": 3, "refused": 4}


@dataclass
class Planned:
    """One layout of the plan: the run `python -m bench` would make of it (None where it would refuse it) and
    what is predicted of it."""

    layout: Layout
    run: Run | None
    status: str  # fits | does not fit | slower (than those that fit: not simulated) | not predicted | refused
    note: str
    device_memory_mb: float
    device_memory_from: str
    memory: dict | None = None  # MiB by kind and `total`, rank 0 at its step's peak
    time: dict | None = None  # the step's parts in ms, a priori (`bench.plan.formula`)
    rank_tflops: float | None = None
    throughput_from: str | None = None
    calibration: dict = field(default_factory=dict)  # factor, ms, what they rest on
    predicted_step_ms: float | None = None  # calibrated
    predicted_tokens_per_s_per_device: float | None = None

    @property
    def micro_batch(self) -> int:
        """Each replica's batch per accumulation step (a layout bench would refuse has none)."""
        return self.run.config["global_batch"] // self.layout.degrees.dp // self.layout.grad_accum

    def line(self) -> dict:
        """The plan table's row."""
        layout = self.layout
        line = {"world_size": layout.world, "nodes": layout.nodes, "strategy": layout.strategy,
                "layout": layout.label, "activation_checkpointing": layout.activation_checkpointing,
                "grad_accum": layout.grad_accum, "micro_batch": self.micro_batch if self.run else None,
                "device_memory_mb": self.device_memory_mb, "device_memory_from": self.device_memory_from,
                "status": self.status, "note": self.note}
        if self.memory:
            line.update({f"{k}_mb": self.memory[k] for k in MEMORY_KINDS}, predicted_peak_mb=self.memory["total"],
                        headroom_pct=100 * (1 - self.memory["total"] / self.device_memory_mb))
        line["throughput_from"] = self.throughput_from
        if self.time:
            line.update({f"predicted_{k}": v for k, v in self.time.items()}, rank_tflops=self.rank_tflops,
                        overhead_factor=self.calibration["factor"], overhead_ms=self.calibration["ms"],
                        calibration=self.calibration["source"], predicted_step_ms=self.predicted_step_ms,
                        predicted_tokens_per_s_per_device=self.predicted_tokens_per_s_per_device)
        return line


def make_plan(planning: Planning, calibrate: bool | None = None, prune: bool = True) -> list[Planned]:
    """Every layout, predicted and ranked. `calibrate` overrides `plan.calibrate`. With `prune` (and a step time
    to predict), a layout is simulated only where it can be among its strategy's `plan.shown_per_strategy`
    fastest that fit at its world size: the most promising first, and one whose step without its traced
    collectives (`StepTimeModel.lower_bound_ms`: compute, bubble and what the strategy counts) is slower than
    that many that fit is "not simulated" (a 70B plan at 1,024 ranks lists hundreds of layouts; a simulation
    takes seconds)."""
    plan = planning.plan if calibrate is None else {**planning.plan, "calibrate": calibrate}
    with Simulations(plan["workers"] or min(machine_cores(), MOST_WORKERS)) as simulations:
        return sorted(planned_layouts(planning, plan, prune, simulations), key=rank_key)


def planned_layouts(planning: Planning, plan: dict, prune: bool, simulations: Simulations) -> list[Planned]:
    """`make_plan`'s layouts, in the order they were predicted."""
    model = StepTimeModel(planning.base, plan, planning.network, planning.device_name, planning.peak_tflops,
                          planning.single_run)
    keep = plan["shown_per_strategy"] if prune and planning.network.measured else None
    listed = candidates(planning.base, plan, planning.knobs, planning.network.gpus_per_node)
    simulations.expect(sum(c.run is not None for c in listed), simulated_at_depths(planning.base["model"]))
    bounds = {id(c): model.lower_bound_ms(c.run) if keep and c.run else None for c in listed}
    listed.sort(key=lambda c: bounds[id(c)] or 0.0)
    fastest: dict[tuple[int, str], list[float]] = {}  # (world, strategy) -> step ms of those that fit
    devices: dict[int, tuple[float, str]] = {}
    floors: dict[int, float] = {}

    def device(layout: Layout) -> tuple[float, str]:
        return devices.setdefault(layout.world, per_rank_memory_mb(plan, layout.ranks_per_node))

    def slower(candidate) -> str | None:
        """Why the layout is not simulated, where its step's lower bound is slower than `keep` layouts of its
        strategy that fit at its world size."""
        layout, bound = candidate.layout, bounds[id(candidate)]
        faster = sorted(fastest.get((layout.world, layout.strategy), []))[:keep or 0]
        if keep and bound is not None and len(faster) == keep and bound > faster[-1]:
            return (f"not simulated: at least {bound:,.0f} ms a step, slower than {keep} {layout.strategy} layouts "
                    "that fit")
        return None

    def to_simulate(candidate) -> bool:
        """Whether the plan will simulate the layout, as far as it knows yet: it runs, is not slower, and its
        floor fits."""
        if candidate.run is None or slower(candidate):
            return False
        if id(candidate) not in floors:
            floor, _ = floor_mb(candidate.run)
            floors[id(candidate)] = floor["total"] if floor else 0.0
        return floors[id(candidate)] <= device(candidate.layout)[0]

    tokens = None
    planned = []
    for i, candidate in enumerate(listed):
        layout, run = candidate.layout, candidate.run
        device_mb, source = device(layout)
        if run is None:
            planned.append(Planned(layout, None, "refused", candidate.refusal, device_mb, source))
            continue
        if why := slower(candidate):
            planned.append(Planned(layout, run, "slower", why, device_mb, source))
            continue
        later = listed[i + 1:]
        simulations.ahead((id(c), c.run, device(c.layout)[0]) for c in later if to_simulate(c))
        status, note, memory = simulations.verdict(id(candidate), run, device_mb,
                                                   lambda later=later: sum(map(to_simulate, later)))
        line = Planned(layout, run, status, note, device_mb, source, memory)
        planned.append(line)
        if status == "does not fit" and (memory is None or memory["method"] == "bound"):
            continue  # turned away by a floor, unsimulated or simulated at its shallowest only
        if memory is None and run.strategy.memory(run).traces_collectives:
            continue  # its collectives come from the simulation that could not run: no step time either
        if not planning.network.measured:
            continue
        line.time, line.rank_tflops, line.throughput_from = model.predict(run, memory)
        if line.time is None:
            continue
        factor, ms, calibrated_by = model.overhead(run)
        line.calibration = {"factor": factor, "ms": ms, "source": calibrated_by}
        line.predicted_step_ms = line.time["step_ms"] * factor + ms
        tokens = tokens or run.model.tokens_per_sample(run.config["model"]) or 1
        line.predicted_tokens_per_s_per_device = (run.config["global_batch"] * tokens / line.predicted_step_ms
                                                  * 1e3 / layout.world)
        if line.status == "fits":
            fastest.setdefault((layout.world, layout.strategy), []).append(line.predicted_step_ms)
    return planned


def rank_key(line: Planned) -> tuple:
    speed = line.predicted_tokens_per_s_per_device
    peak = line.memory["total"] if line.memory else float("inf")
    return STATUS_ORDER[line.status], line.layout.world, -(speed if speed is not None else -1), peak


def plan_table(planned: list[Planned]) -> pd.DataFrame:
    """The plan as a table, one line per layout, in its order."""
    table = pd.DataFrame.from_records([line.line() for line in planned])
    for column in ("predicted_peak_mb", "predicted_step_ms", "predicted_tokens_per_s_per_device", "throughput_from"):
        if column not in table:
            table[column] = None if column == "throughput_from" else float("nan")
    return table

