"""A layout's step time, predicted (`bench.plan.formula`) and calibrated by what this strategy's runs measured
here: a factor or a difference that carries what FLOPs and bytes leave out (FSDP's copies into and out of its
flat buffers, DTensor's dispatch, gloo's threads taking the cores compute needs) to the layouts not run. A
layout's own runs (this model, world size and global batch) are never used, so a prediction is never its own
measurement."""

from __future__ import annotations

import json
import statistics

from bench.configs import LENGTH_KEYS
from bench.measure.flops import step_flops
from bench.models import ModelSizes, count_blocks, model_sizes
from bench.plan.formula import predict_step_ms
from bench.plan.network import Network
from bench.plan.rows import warn_once
from bench.plan.throughput import core_share, measured_runs, measured_throughput, rank_tflops
from bench.run import Run

# The runs that calibrate a layout: its strategy's, with its knobs and accumulation, at other world sizes (the
# same model and global batch); else at any model and batch.
SAME_SHAPE_VARIES = ("launch.", "parallel.", *LENGTH_KEYS)
ANY_SHAPE_VARIES = (*SAME_SHAPE_VARIES, "model.", "global_batch")


class StepTimeModel:
    """Predicts a layout's step time (`predict`), and what this strategy's measured runs here say of such
    predictions (`overhead`)."""

    def __init__(self, base: dict, plan: dict, network: Network, device_name: str, peak_tflops: float | None,
                 single_run: tuple[str, ...] = ()):
        self.base, self.plan, self.network, self.device_name = base, plan, network, device_name
        self.peak_tflops = peak_tflops
        self.single_run = single_run  # the overrides of the run that measures the model (`rank_tflops`)
        self.sizes: dict[str, ModelSizes] = {}  # by model configuration

    def model_sizes(self, run: Run) -> ModelSizes:
        key = json.dumps(run.config["model"], sort_keys=True)
        if key not in self.sizes:
            self.sizes[key] = model_sizes(run.config["model"])
        return self.sizes[key]

    def predict(self, run: Run, memory: dict | None) -> tuple[dict | None, float | None, str]:
        """(the step's parts in ms, the rank's TFLOP/s, where the throughput came from)."""
        measured = measured_throughput(self.base["results_dir"], run, self.device_name)
        tflops, source = rank_tflops(run, self.plan, measured, self.peak_tflops, self.single_run)
        if tflops is None:
            return None, None, source
        collectives = (memory or {}).get("collectives", []) + run.strategy.collectives(run, self.model_sizes(run))
        counted = step_flops(run)
        flops = counted["hardware_flops_per_sample"]
        if flops is None:  # the step could not be counted (`bench.measure.flops`)
            return None, None, "no FLOP count of the step"
        time = predict_step_ms(run, flops, tflops, collectives, self.network, self.plan["overlap"],
                               self.plan.get("expert_load", 1.0), counted.get("expert_flops_per_sample") or 0.0)
        return time, tflops, source

    def lower_bound_ms(self, run: Run) -> float | None:
        """The layout's calibrated step without what only its simulation traces (compute, bubble and the
        collectives its strategy counts): none of its predictions is faster. None where no step is predicted."""
        time, _, _ = self.predict(run, None)
        if time is None:
            return None
        factor, ms, _ = self.overhead(run)
        return time["step_ms"] * factor + ms

    def overhead(self, run: Run) -> tuple[float, float, str]:
        """(factor, ms, what they rest on): the layout's step is predicted x factor + ms. By this model's runs of
        the strategy at the same global batch on other world sizes, the factor: their median measured / predicted.
        Else by its other runs (other models, other batches), the ms: their median measured - predicted, per
        block and per core of the rank, times this layout's blocks over its rank's cores. A ratio does not carry
        to another shape: the strategy's own work (DTensor's dispatch per operator, FSDP's copies per layer)
        follows the layers, not their FLOPs (measured: docs/plan-and-search.md, "Calibration"). (1, 0, "") where
        there are none, or `plan.calibrate=false`."""
        name = run.strategy.name
        if not self.plan["calibrate"] or name == "single":  # strategy=single's runs are the throughput itself
            return 1.0, 0.0, ""
        runs = self.predicted_runs(run, strategy_runs(self.base["results_dir"], run, self.device_name))
        if runs:
            factor = statistics.median(row["step_time_ms_p50"] / time for time, row in runs)
            return factor, 0.0, f"x{factor:.2f}: {name}'s measured / predicted, {described(runs, run)}"
        runs = self.predicted_runs(run, strategy_runs(self.base["results_dir"], run, self.device_name, False),
                                   measured_only=True)
        if runs:
            per_block_core = statistics.median((row["step_time_ms_p50"] - time) * core_share(row["config"])
                                               / count_blocks(row["config"]["model"]) for time, row in runs)
            ms = per_block_core * count_blocks(run.config["model"]) / core_share(run.config)
            return 1.0, ms, f"{ms:+.1f} ms: {name}'s measured - predicted per block and core of {described(runs, run)}"
        return 1.0, 0.0, ""

    def predicted_runs(self, run: Run, rows: list[dict], measured_only: bool = False) -> list[tuple[float, dict]]:
        """(predicted step ms, the row) of each run that can be predicted; with `measured_only`, of those whose
        model's throughput here was measured too, so that the difference is the strategy's alone (another
        model's run predicted at an assumed throughput carries how far that model is from the assumption)."""
        from bench.plan.memory import predicted_memory_mb

        out = []
        for row in rows:
            try:
                measured = Run.of({**row["config"], "device": run.device, "results_dir": self.base["results_dir"]})
                time, _, source = self.predict(measured, predicted_memory_mb(measured)[0])
            except Exception as exc:  # a row's config is another run's, as written (a hand edit, an older bench):
                # what fails in it (an unknown strategy, a model size of "x") fails anywhere in the model's and the
                # strategy's code, and must cost that row only, never the plan
                why = (str(exc).strip().splitlines() or [""])[0]
                warn_once(f"{row['_where']}: not used for calibration, its config does not make a run "
                          f"({type(exc).__name__}: {why})")
                continue
            if time and (source.startswith("measured") or not measured_only):
                out.append((time["step_ms"], row))
        return out


def strategy_runs(results_dir: str, run: Run, device_name: str, same_shape: bool = True) -> list[dict]:
    """The measured runs of this layout's strategy with its knobs, accumulation, 2-D-ness, context and expert
    degrees and threads, other than its own (this model at this world size and global batch): with
    `same_shape`, this model's at the same global batch on other world sizes; else every other one, any model
    and batch."""
    rows = measured_runs(results_dir, run.config, device_name, SAME_SHAPE_VARIES if same_shape else ANY_SHAPE_VARIES)
    return [row for row in rows
            if row.get("step_time_ms_p50")
            and not (row["config"]["model"] == run.config["model"] and row.get("world_size") == run.world_size
                     and row.get("global_batch") == run.config["global_batch"])
            and (row["config"]["parallel"]["tp"] > 1) == (run.degrees.tp > 1)
            and row["config"]["parallel"].get("cp", 1) == run.degrees.cp
            and row["config"]["parallel"].get("ep", 1) == run.degrees.ep
            and row["config"]["launch"].get("omp_num_threads") == run.config["launch"]["omp_num_threads"]]


def described(runs: list[tuple[float, dict]], run: Run) -> str:
    """Which runs: "gpt at 2, 4 rank(s) (4 run(s))", their global batch where it is not the layout's."""
    worlds: dict[str, set] = {}
    for _, row in runs:  # a row may lack its own model, batch and world size (null): its config has the model
        batch = row.get("global_batch")
        batch = "" if batch == run.config["global_batch"] else f" (global batch {batch})"
        model = row.get("model") or str(row["config"]["model"].get("name"))
        worlds.setdefault(model + batch, set()).add(row.get("world_size"))
    by = "; ".join(f"{model} at {', '.join(str(n) for n in sorted(w, key=lambda n: (n is None, n or 0)))} rank(s)"
                   for model, w in worlds.items())
    return f"{by} ({len(runs)} run(s))"
