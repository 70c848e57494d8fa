"""Each rank's memory, predicted before anything is allocated: the run's own rank simulated on fake tensors.

How is each strategy's to say (its `memory` hook, `bench.strategies`):
- simulated: the model is built on the meta device, the run's strategy shards or splits it over a fake process
  group (torch's FakeProcessGroup: this one process plays rank 0 of the whole world and every collective does
  nothing) under FakeTensorMode, the optimizer's state is made (`optimizer_state`), and one training step runs
  under torch's MemTracker, the tracker bench's own measurement uses (`bench.rank.tracked_step`): the
  prediction counts the same tensors by the same rules, at the same point (a step after the first, the
  optimizer holding its state). Nothing is allocated and nothing is
  computed, so the GPT and MLP here take about a second. The collectives the step runs are traced too.
- one replica: strategy=single on one data-parallel replica's share of the batch, its optimizer state divided
  over the ranks that shard it, plus a flat copy of the gradients where a reducer buckets them (DDP's C++
  reducer needs real storage, so DDP and ZeRO cannot run on fake tensors).
- stage by stage: each pipeline rank's stages in the schedule's order (`bench.plan.pipeline`).
- not predicted, with the strategy's reason: the run says why its memory was not checked.

A prediction's `method` is "simulated"; where the simulation fails, `predicted_memory_mb(run, fallback=True)` gives
the memory check a floor instead (`method` "bound", `bound_mb`). Nothing here allocates the model's or the batch's
memory for real (`no_large_tensors`).
"""

from __future__ import annotations

import logging
import warnings

from bench.measure.memory import no_large_tensors, optimizer_state, quiet_fake_tensors
from bench.plan.bound import bound_mb, failure
from bench.plan.depth import by_depth
from bench.plan.fake import no_cycle_collection

log = logging.getLogger("bench.plan")


# What a prediction depends on: a later call with the same values reads it from the cache. SIMULATION names what
# the simulation counts: a change to it makes older cached predictions stale.
SIMULATION = ("collectives with span, zero-bubble passes, pipeline receive buffers, synthetic data, fp16 scaler, "
              "method, bound, depth extrapolated, 3-D stages, micro-batches extrapolated, each phase's start and peak, "
              "context parallel masks per step, experts sharded over dp_mod_ep, experts balanced when simulated, "
              "experts sharded on dim 1 where their count does not divide, cp K/V heads not repeated, "
              "pipelines at two depths, no cycle collection, uneven stages extrapolated apart")
PREDICTION_KEYS = ("model", "data", "global_batch", "strategy", "parallel", "precision", "grad_accum",
                   "activation_checkpointing", "optim", "seed")


def predicted_memory_mb(run, fallback: bool = False, whole: bool = False) -> tuple[dict | None, str]:
    """(MiB by kind (`bench.measure.memory.KINDS`) and their `total`, on rank 0 at its step's peak, `method`
    "simulated", and where the rank was simulated the `collectives` its step ran (`bench.plan.collectives`); why
    not, where there is no prediction). With `fallback` (the memory check's; the planner prices a simulation's
    collectives), where the simulation failed: the bound (`bound_mb`) and why. Cached under
    `<results_dir>/.cache/memory/`: MemTracker's bookkeeping takes minutes for billions of parameters."""
    import torch

    from bench.results import cached_json

    cfg = run.config
    key = {k: cfg[k] for k in PREDICTION_KEYS} | {"world": run.world_size, "torch": torch.__version__,
                                                 "simulation": SIMULATION} | ({"whole": True} if whole else {})
    def compute() -> dict:
        predicted, why = predict(run, whole)
        if predicted is not None or run.strategy.memory(run).how == "not predicted":
            return {"predicted": predicted, "why": why}
        bound, bound_why = bound_mb(run, why)
        return {"predicted": None, "why": why, "bound": bound, "bound_why": bound_why}

    cached = cached_json(cfg["results_dir"], "memory", key, compute)
    if fallback and "bound_why" in cached:
        return cached["bound"], cached["bound_why"]
    return cached["predicted"], cached.get("why") or ""


def shallowest_mb(run) -> tuple[float | None, str]:
    """A floor of the run's predicted peak and what it rests on: its model simulated at the fewest blocks the
    prediction starts from (`by_depth`), each simulation cached (the prediction reads it again); (None, "") where
    nothing is simulated."""
    predicted, _ = predict(run, shallowest=True)
    if predicted is None:
        return None, ""
    return predicted["total"], predicted.get("depths") or "the whole model"


def cached_simulation(simulate):
    """`simulate(run)` cached by what the run's prediction depends on (`PREDICTION_KEYS`): a deep model's depths
    are simulated once whether a floor (`shallowest_mb`) or the prediction asks."""
    import torch

    from bench.results import cached_json

    def cached(run) -> dict:
        cfg = run.config
        key = {k: cfg[k] for k in PREDICTION_KEYS} | {"world": run.world_size, "torch": torch.__version__,
                                                     "simulation": SIMULATION, "simulate": simulate.__name__}
        return cached_json(cfg["results_dir"], "simulations", key, lambda: simulate(run))

    return cached


def predict(run, whole: bool = False, shallowest: bool = False) -> tuple[dict | None, str]:
    """The prediction the strategy's `memory` hook asks for, or (None, why): where it declares none, and where the
    model's own code cannot run on fake tensors (DeepSeek-V3's attention with a mask, which repeats its
    key/value heads once too often there): the memory check then takes the bound. A
    deep model is simulated at two depths and extrapolated to its own (`by_depth`), unless
    `whole`."""
    import torch.distributed as dist

    how = run.strategy.memory(run)
    if how.how == "not predicted":
        return None, f"strategy={run.strategy.name} is not predicted ({how.reason})"
    try:
        with quiet_fake_tensors(), warnings.catch_warnings(), no_cycle_collection():
            # FSDP2 warns that a wrapped module returned a view, which can drop its pre-backward hook; raised here
            # by the simulation's fake tensors, it opened every plan though nothing ran (real ranks still warn)
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
            # MemTracker's module tracker warns where a module's forward starts while it still counts the module as
            # running (the pipelines' simulations): bench reads the step's peak, none of its per-module statistics
            warnings.filterwarnings("ignore", message="The module hierarchy tracking maybe be messed up")
            if how.how == "one replica":
                simulated = as_one_replica(run, how.optimizer_shards, how.gradient_buckets, whole, shallowest)
            else:
                from bench.plan.pipeline import by_microbatches, by_microbatches_whole

                pipeline = by_microbatches_whole if whole else by_microbatches
                simulate = cached_simulation(pipeline if how.how == "stage by stage" else simulate_rank)
                # a pipeline's moments are its work items', each affine from one block a stage (`by_depth`)
                simulated = by_depth(simulate, run, how.stages, whole, shallowest,
                                     checked=how.how != "stage by stage")
            return simulated | {"method": "simulated"}, ""
    except Exception as exc:
        log.debug("memory not simulated", exc_info=True)  # said once, where `why` is read (the run's warning)
        if dist.is_initialized():
            dist.destroy_process_group()
        return None, f"memory not predicted: {failure(exc)}"


def as_one_replica(run, optimizer_shards: int, gradient_buckets: bool, whole: bool = False,
                   shallowest: bool = False) -> dict:
    """strategy=single on one data-parallel replica's share of the global batch (`by_depth`), its optimizer
    state divided over `optimizer_shards` ranks, plus the gradient buckets' flat copy."""
    replica = run.replace(global_batch=run.config["global_batch"] // run.degrees.dp, strategy={"name": "single"},
                          parallel={"dp": 1, "tp": 1, "pp": 1},
                          launch={**run.config["launch"], "nnodes": 1, "nproc": 1})
    memory = by_depth(cached_simulation(simulate_rank), replica, 1, whole, shallowest)
    memory["collectives"] = []  # one replica's: none (the strategy counts its own, `collectives`)
    memory["total"] -= memory["optim"] * (1 - 1 / optimizer_shards)
    memory["optim"] /= optimizer_shards
    if gradient_buckets:
        add_gradient_buckets(memory, run.config["grad_accum"])
    return memory


def add_gradient_buckets(memory: dict, grad_accum: int) -> None:
    """DDP's buckets, a flat copy of the gradients that MemTracker files under temporaries, filled as gradients
    become ready in the synchronising backward. With gradient accumulation every gradient is held already when
    that backward begins, so the copy adds to the replica's peak. Without, the copy takes the place of activations
    being freed, and the peak is the larger of the replica's and the end of backward's: weights, gradients,
    optimizer state and the copy (both measured against runs: docs/plan-and-search.md)."""
    bucket = memory["params"]  # trainable fp32 weights: the gradients' size
    if grad_accum > 1:
        memory["temp"] += bucket
        memory["total"] += bucket
        return
    end_of_backward = memory["params"] + memory["params"] + memory["optim"] + bucket + memory["other"]
    memory["total"] = max(memory["total"], end_of_backward)


def simulate_rank(run) -> dict:
    """Rank 0 of the run's world on a fake process group and fake tensors (`fake_world`): its memory at the peak
    of a step after the first (`optimizer_state`), and the collectives of that step."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.data import build_data
    from bench.models import build_on_meta
    from bench.plan.collectives import CollectiveRecorder
    from bench.plan.fake import fake_world, real_mesh_tables
    from bench.rank.tracked_step import tracked_step_moments

    # shapes only: the CPU's fake tensors serve any device, and every data source's batches are shaped as the
    # synthetic ones (bench.data), which need no files written and no DataLoader workers
    sim = run.replace(device="cpu", compile=False, data={"name": "synthetic", "num_batches": 1})
    with fake_world(run) as topo:
        torch.manual_seed(run.config["seed"])
        with no_large_tensors():
            model = build_on_meta(run.config["model"])
        with FakeTensorMode(allow_non_fake_inputs=True), real_mesh_tables():
            parallel = sim.strategy.apply(model, topo, sim)
            steps_past_the_scalers_check(parallel)
            batches = build_data(sim, topo)
            optimizer_state(parallel.module.parameters(), parallel.optimizer)
            with CollectiveRecorder(run.world_size) as recorder:
                peak, moments = tracked_step_moments(parallel, batches)
                return peak | {"moments": moments, "collectives": recorder.as_list()}


def steps_past_the_scalers_check(parallel) -> None:
    """fp16's GradScaler steps only where no gradient is inf or nan, read with `.item()` (`_maybe_opt_step`): a
    value no fake tensor has (DataDependentOutputException, `aten._local_scalar_dense`). A measured step steps, so
    the simulated one always does; scaling and unscaling in place still run (fp16 then holds what bf16 holds)."""
    if getattr(parallel, "scaler", None) is not None:
        parallel.scaler._maybe_opt_step = lambda optimizer, state, *args, **kwargs: optimizer.step(*args, **kwargs)


def available_memory_mb(run) -> tuple[float, str]:
    """What each rank of this node may hold (`rank_memory_mb`), or `memory_limit_gb` where it is lower."""
    available = rank_memory_mb(run.device, run.nproc)
    limit = run.config.get("memory_limit_gb")
    if limit and limit * 1024 < available[0]:
        return limit * 1024, f"memory_limit_gb={limit}"
    return available


def rank_memory_mb(device: str, ranks: int) -> tuple[float, str]:
    """What one of `ranks` ranks on this machine may hold, and where the figure comes from: the GPU's memory on
    CUDA, this machine's available memory (MemAvailable) shared by the ranks on CPU."""
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory / 2**20
        return total, f"{torch.cuda.get_device_name(0)}: {total / 1024:.1f} GB"
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024
    return available / ranks, f"{available / 1024:.1f} GB available on this machine / {ranks} rank(s)"


def memory_refusal(predicted: dict, available: float, where: str) -> str | None:
    """One line when the predicted peak (or the bound, which is a floor) exceeds what a rank may hold, else None."""
    if predicted["total"] <= available:
        return None
    peak = "a bound (its step not simulated)" if predicted.get("method") == "bound" else "a predicted peak"
    parts = ", ".join(f"{kind} {predicted[kind] / 1024:.2f}" for kind in ("params", "grads", "optim", "activations",
                                                                        "temp") if predicted[kind] >= 1)
    return (f"memory: expected a run that fits in {available / 1024:.1f} GB per rank ({where}), got {peak} of "
            f"{predicted['total'] / 1024:.1f} GB on rank 0 ({parts} GB). Lower global_batch or the model's "
            "sizes, or shard it (`python -m bench.plan` lists each strategy's memory per rank), or pass force=true "
            "to run anyway.")
