"""The fake world a rank is simulated in (`bench.plan.memory`, `bench.plan.pipeline`): this process as rank 0 of the
run's world on torch's fake process group, its mesh built for real, and DTensor's caches cleared after."""

from __future__ import annotations

import contextlib
import gc
import sys


@contextlib.contextmanager
def fake_world(run):
    """This process as rank 0 of the run's world on a fake process group (`fake_process_group`), its `Topology`
    with the mesh built (before any fake mode: the mesh's rank tables are real tensors)."""
    from bench.parallel.topology import Topology

    world = run.world_size
    with fake_process_group(world):
        topo = Topology(world_size=world, rank=0, local_rank=0, local_world_size=world, device="cpu",
                        backend="fake", **run.degrees.as_dict())
        topo.mesh()
        yield topo


@contextlib.contextmanager
def fake_process_group(world: int):
    """This process as rank 0 of `world` ranks on torch's fake process group (every collective does nothing),
    for the duration only, and so is the `sys.excepthook` it wraps."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already set up in this process: no rank can be simulated here")
    # init_process_group wraps sys.excepthook in `_distributed_excepthook` ("[rank0]: " before each line) and
    # destroy_process_group leaves it: after a sweep of N runs a controller's traceback had the prefix N times
    excepthook = sys.excepthook
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = excepthook
        forget_dtensor_plans()


def forget_dtensor_plans() -> None:
    """DTensor caches its sharding propagation and redistribution plans by specs whose meshes compare equal
    across process groups: a later simulation on an equal mesh reused a plan naming the destroyed group
    ("Could not resolve the process group registered under the name 17": FSDP x TP after an HSDP layout)."""
    import torch
    from torch.distributed.tensor import DTensor, _redistribute

    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", lambda: None)()  # its C++ fast path's (2.10+)
    _redistribute._gen_transform_infos.cache_clear()


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


@contextlib.contextmanager
def no_cycle_collection():
    """Python's cycle collector paused: where it ran during a simulated step, it freed tensors held in reference
    cycles there and not at the same point in another process, and the same layout's peak differed from process to
    process (a GPT pipeline's from 126.99 to 127.74 MB, by what the process had run before). Paused, the tensors a
    step leaves in cycles are held to its end; collected after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
