"""Each rank's memory, predicted before anything is allocated: the run's own rank simulated on fake tensors.

The model is built on the meta device, the run's strategy shards or splits it over a fake process group
(torch's FakeProcessGroup: this one process plays rank 0 of the whole world and every collective does
nothing) under FakeTensorMode, and two training steps run under torch's MemTracker, the tracker bench's own
measurement uses (`bench.rank.train.tracked_step`): the prediction counts the same tensors by the same rules,
at the same point (the second step, when the optimizer holds its state). Nothing is allocated and nothing is
computed, so the GPT and MLP here take about a second.

Simulated as they run: single, fsdp, tensor; the pipeline's ranks one by one, interleaved too
(`bench.plan.pipeline`); dataparallel and modelparallel where their one process uses one device (measured:
within 0.1 MB of the MLP's and the GPT's runs, the split-size pipelining too). DDP's C++ reducer needs real
storage, so DDP is simulated as one replica (`strategy=single` at the per-replica batch) plus DDP's gradient
buckets; ZeRO likewise, with its optimizer state divided by the data-parallel size. Not predicted yet:
dataparallel and modelparallel over several devices (device 0 gathers the outputs; each stage's device holds
its own share).
"""

from __future__ import annotations

import contextlib
import copy
import logging

log = logging.getLogger("bench.plan")

SIMULATED = ("single", "fsdp", "tensor", "dataparallel", "modelparallel")
AS_ONE_REPLICA = ("ddp", "zero")
ONE_PROCESS = ("dataparallel", "modelparallel")  # several devices driven by one process


# What a prediction depends on: a later call with the same values reads it from the cache. SIMULATION names what
# the simulation counts: a change to it makes older cached predictions stale.
SIMULATION = "collectives, pipeline receive buffers, synthetic data"
PREDICTION_KEYS = ("model", "data", "global_batch", "strategy", "parallel", "precision", "grad_accum",
                   "activation_checkpointing", "optim", "seed")


def predicted_memory_mb(cfg: dict) -> dict | None:
    """MiB by kind (`bench.measure.memory.KINDS`) and their `total`, on rank 0 at its step's peak, and where
    the rank was simulated the `collectives` its step ran (`bench.plan.collectives`); None where the strategy
    is not predicted. Cached under `<results_dir>/.cache/memory/` (a Llama 3 8B FSDP rank takes
    49 s on this machine's CPU: MemTracker's peak bookkeeping walks every live tensor at every operator)."""
    import torch

    from bench.results import cached_json

    key = {k: cfg[k] for k in PREDICTION_KEYS} | {"world": cfg["launch"]["nnodes"] * cfg["launch"]["nproc"],
                                                 "torch": torch.__version__, "simulation": SIMULATION}
    return cached_json(cfg["results_dir"], "memory", key, lambda: {"predicted": predict_or_none(cfg)})["predicted"]


def predict_or_none(cfg: dict) -> dict | None:
    """`predict`, or None where the model's own code cannot run on fake tensors: a prediction that cannot be
    made never stops a run (Mixtral's experts on torch 2.13: the fake kernel of `_grouped_mm` takes bf16 only,
    while the CPU runs them in fp32)."""
    import torch.distributed as dist

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # logs the failing op's whole stack first
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        return predict(cfg)
    except Exception as exc:
        log.warning("memory not predicted: %s on fake tensors: %s", type(exc).__name__, str(exc).splitlines()[0])
        if dist.is_initialized():
            dist.destroy_process_group()
        return None
    finally:
        fake_log.setLevel(level)


def predict(cfg: dict) -> dict | None:
    name = cfg["strategy"]["name"]
    if name in ONE_PROCESS and process_devices(cfg) > 1:
        return None
    if name in SIMULATED:
        return simulate_rank(cfg)
    if name == "pipeline":
        from bench.plan.pipeline import simulate_pipeline

        return simulate_pipeline(cfg)
    if name not in AS_ONE_REPLICA:
        return None
    dp = cfg["parallel"]["dp"]
    memory = simulate_rank(one_replica(cfg))
    del memory["collectives"]  # one replica's: none (bench.plan.collectives counts DDP's and ZeRO's)
    if name == "zero":
        memory["total"] -= memory["optim"] * (1 - 1 / dp)
        memory["optim"] /= dp
    if name in ("ddp", "zero") and dp > 1 and not cfg["strategy"].get("gradient_as_bucket_view", False):
        add_gradient_buckets(memory, cfg["grad_accum"])
    return memory


def process_devices(cfg: dict) -> int:
    """How many devices a one-process strategy's process drives."""
    import torch

    from bench.models import count_blocks
    from bench.strategies.modelparallel import stage_devices

    if cfg["strategy"]["name"] == "modelparallel":
        return len(set(stage_devices(cfg, count_blocks(cfg["model"]))))
    if cfg["device"] != "cuda":
        return 1  # nn.DataParallel calls the module itself
    return cfg["strategy"]["devices"] or torch.cuda.device_count()


def add_gradient_buckets(memory: dict, grad_accum: int) -> None:
    """DDP's buckets, a flat copy of the gradients that MemTracker files under temporaries, filled as gradients
    become ready in the synchronising backward. With gradient accumulation every gradient is held already when
    that backward begins, so the copy adds to the replica's peak (measured: 11.2 MB against 9.1 without it,
    the GPT with grad_accum=2). Without, the copy takes the place of activations being freed, and the peak is
    the larger of the replica's and the end of backward's: weights, gradients, optimizer state and the copy
    (the MLP: 72.3 MB measured, 72.2 predicted; the GPT at 16 samples: the replica's 15.6 against 15.9)."""
    bucket = memory["params"]  # trainable fp32 weights: the gradients' size
    if grad_accum > 1:
        memory["temp"] += bucket
        memory["total"] += bucket
        return
    end_of_backward = memory["params"] + memory["params"] + memory["optim"] + bucket + memory["other"]
    memory["total"] = max(memory["total"], end_of_backward)


def one_replica(cfg: dict) -> dict:
    """`strategy=single` on one data-parallel replica's share of the global batch."""
    replica = copy.deepcopy(cfg)
    replica["global_batch"] = cfg["global_batch"] // cfg["parallel"]["dp"]
    replica["strategy"] = {"name": "single"}
    replica["parallel"] = {"dp": 1, "tp": 1, "pp": 1}
    replica["launch"] = {**cfg["launch"], "nnodes": 1, "nproc": 1}
    return replica


def simulate_rank(cfg: dict) -> dict:
    """Rank 0 of the run's world on a fake process group and fake tensors: its memory at the second step's
    peak, and the collectives of its first step. The process group is this process's for the duration only."""
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from bench.data import build_data
    from bench.models import build_on_meta
    from bench.plan.collectives import CollectiveRecorder
    from bench.rank.topology import Topology
    from bench.rank.train import tracked_step
    from bench.strategies import apply_strategy

    if dist.is_initialized():
        raise RuntimeError("a process group is already set up in this process: no rank can be simulated here")
    world = cfg["launch"]["nnodes"] * cfg["launch"]["nproc"]
    # shapes only: the CPU's fake tensors serve any device, and every data source's batches are shaped as the
    # synthetic ones (bench.data), which need no files written and no DataLoader workers
    sim = {**cfg, "device": "cpu", "compile": False, "data": {"name": "synthetic", "num_batches": 1}}
    topo = Topology(world_size=world, rank=0, local_rank=0, local_world_size=world, device="cpu", backend="fake",
                    **cfg["parallel"])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        topo.mesh()  # before the fake mode: the mesh's rank tables are real tensors
        torch.manual_seed(cfg["seed"])
        model = build_on_meta(cfg["model"])
        with FakeTensorMode(allow_non_fake_inputs=True), real_mesh_tables():
            parallel = apply_strategy(model, topo, sim)
            batches = build_data(sim, topo)
            with CollectiveRecorder(world) as recorder:
                parallel.train_step(*next(batches))  # the optimizer's state exists from the first step on
            return tracked_step(parallel, batches) | {"collectives": recorder.as_list()}
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def real_mesh_tables():
    """DeviceMeshes made under the fake mode keep real rank tables: FSDP over a 2-D mesh concatenates its
    dp and tp meshes when it shards (`_init_sharding_spec_tp`), and a mesh computes its coordinates with
    `nonzero`, whose output shape a fake tensor cannot know."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh

    make = DeviceMesh.__init__

    def made_for_real(self, *args, **kwargs):
        with unset_fake_temporarily():
            make(self, *args, **kwargs)

    DeviceMesh.__init__ = made_for_real
    try:
        yield
    finally:
        DeviceMesh.__init__ = make


def available_memory_mb(cfg: dict) -> tuple[float, str] | None:
    """What each rank of this node may hold (`rank_memory_mb`); None where the controller does not run on the
    ranks' machine (SLURM, several nodes, inline)."""
    if cfg["launch"]["name"] != "local":
        return None
    available = rank_memory_mb(cfg["device"], cfg["launch"]["nproc"])
    limit = cfg.get("memory_limit_gb")
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
    """One line when the predicted peak exceeds what a rank may hold, else None."""
    if predicted["total"] <= available:
        return None
    parts = ", ".join(f"{kind} {predicted[kind] / 1024:.2f}" for kind in ("params", "grads", "optim", "activations",
                                                                        "temp") if predicted[kind] >= 1)
    return (f"memory: expected a run that fits in {available / 1024:.1f} GB per rank ({where}), got a predicted "
            f"peak of {predicted['total'] / 1024:.1f} GB on rank 0 ({parts} GB). Lower global_batch or the model's "
            "sizes, or shard it (strategy=fsdp, zero, tensor), or pass force=true to run anyway.")
