"""The memory-tracked step: one step after the timed ones under torch's MemTracker, which follows every tensor's
storage; what a rank holds at the step's peak, by kind (`bench.measure.memory`), and the step's moments, which
the planner's simulation extrapolates (`bench.plan.depth`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from bench.strategies.base import Parallel


def tracked_step(parallel: Parallel, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """One more step, after the timed ones, under torch's MemTracker: what this rank's tensors take at the
    step's peak, by kind (see `bench.measure.memory`). Every rank runs it: the step has collectives."""
    return tracked_step_moments(parallel, batches)[0]


def tracked_step_moments(parallel: Parallel, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict,
                                                                                                              list]:
    """`tracked_step`'s peak, and its moments (`StepMemTracker.moments`, MiB by kind): the planner's simulation
    extrapolates each."""
    from bench.measure.memory import peak_by_kind_mb

    x, y = next(batches)
    tracker = step_memory_tracker()
    # ZeroRedundancyOptimizer keeps this rank's shard of the optimizer state in its local optimizer
    tracker.track_external(parallel.module, getattr(parallel.optimizer, "optim", parallel.optimizer), x, y)
    with tracker:
        parallel.train_step(x, y)
    return peak_by_kind_mb(tracker.get_tracker_snapshot("peak")), [peak_by_kind_mb(m) for m in tracker.moments]


UNTRACKED_FUNCTIONAL_OPS = ("_c10d_functional::wait_tensor", "_c10d_functional::_wrap_tensor_autograd")
SETTLE_TIMEOUT_S = 1.0


def tensors_in(tree) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def on_host_threads(tensors: list[torch.Tensor]) -> bool:
    """Real CPU tensors: gloo's, whose collectives its worker threads run (not CUDA's streams; not the
    planner's fake tensors, whose fake collectives hold nothing)."""
    from torch._subclasses.fake_tensor import is_fake

    return hasattr(torch.Tensor, "_use_count") and all(t.device.type == "cpu" and not is_fake(t) for t in tensors)


def released_by_the_communication_thread(inputs: list[torch.Tensor], held: list[int],
                                         outputs: list[torch.Tensor]) -> bool:
    """A functional collective waited for at once, then until gloo's worker thread has let go of its tensors: each
    input back to the references it had before (`held`), each new output to the caller's one. The thread drops
    them a moment after it marks the work done; on a loaded machine the step ran on meanwhile, and what it had
    freed was counted held (docs/strategies.md, Memory). A collective whose tensors are still held after
    `SETTLE_TIMEOUT_S` ends the waiting for the rest of the step: False."""
    for out in outputs:
        torch.ops._c10d_functional.wait_tensor(out)  # the step's own wait, later, finds no work and returns
    expected = [*zip(inputs, held, strict=True), *((out, 1) for out in outputs if not any(out is t for t in inputs))]
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while any(t._use_count() > n for t, n in expected):
        if time.monotonic() > deadline:
            return False
        time.sleep(1e-4)
    return True


def step_memory_tracker():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker
    from torch.distributed._tools.mod_tracker import ModTracker

    class LeafSafeModTracker(ModTracker):
        def _fw_pre_hook(self, mod, input):
            # ModTracker hooks the gradients of a module's inputs to see its backward end; for an input that is a
            # leaf (a pipeline stage's received activations), that hook fails under autograd.grad, which
            # zero-bubble schedules run for the input gradient ("A leaf node was passed to
            # _will_engine_execute_node ..."). Such inputs are handed on detached (the same storage): the module's
            # backward is then seen to end with its other inputs', or after the backward.
            input = tuple(t.detach() if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf else t
                          for t in input)
            super()._fw_pre_hook(mod, input)

    class StepMemTracker(MemTracker):
        def __init__(self):
            super().__init__()
            self._mod_tracker = LeafSafeModTracker()
            # The step in phases: forward (outside autograd's engine) and backward (inside it, a checkpoint's
            # recompute too), cut further where `mark` is called (a pipeline's work items). Each phase's start and
            # its peak: what a deeper model holds at each grows by as much a block, while the step's peak moves
            # between them (a 70B Llama's FSDP step peaks in its gradients' reduction at 2 to 4 blocks, at its
            # loss, every block's input held, at 80).
            self.moments: list[dict] = []
            self._marks, self._phase = 0, None
            self._settle = True  # `released_by_the_communication_thread`, until it once times out

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace != "_c10d_functional" or func.name() in UNTRACKED_FUNCTIONAL_OPS:
                return super().__torch_dispatch__(func, types, args, kwargs)
            inputs = tensors_in((args, kwargs))
            held = [t._use_count() for t in inputs] if on_host_threads(inputs) else None
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if held is not None and self._settle:
                self._settle = released_by_the_communication_thread(inputs, held, tensors_in(out))
                if not self._settle:
                    logging.getLogger("bench.rank").warning(
                        "memory: %s's tensors still held %.0f s after it finished; the rest of the tracked step's "
                        "collectives free theirs when gloo's thread lets go", func.name(), SETTLE_TIMEOUT_S)
            return out

        def mark(self) -> None:
            """A new phase starts here."""
            self._marks += 1

        def _pre_fw_hook(self, module, inputs):
            # MemTracker refuses a second forward of a root module ("multiple iterative calls": its per-module
            # statistics would mix two iterations). Within the one step tracked here, a pipeline schedule's
            # micro-batches, gradient accumulation and the split-size trick call a root module several times.
            # bench reads only the step's peak, which the dispatch mode updates on every op, so later calls
            # keep the module statistics of the first.
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                return
            super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state) -> None:
            # bench reads the step's peak alone; MemTracker also keeps each module's, walking every module seen so
            # far on every operator: a third of a pipeline simulation's time (a 1.7B GPT's stages: 48 s, 33 s
            # without it), none of it needed
            phase = (self._marks, torch._C._current_graph_task_id() != -1)
            if phase != self._phase:
                self._phase = phase
                self.moments += [copied(self._curr_mem_snap), copied(self._curr_mem_snap)]  # its start, its peak
            elif total(self._curr_mem_snap) > total(self.moments[-1]):
                self.moments[-1] = copied(self._curr_mem_snap)
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snapshot)

    def copied(snapshot: dict) -> dict:
        return {device: dict(kinds) for device, kinds in snapshot.items()}

    def total(snapshot: dict) -> int:
        return sum(kinds[_TOTAL_KEY] for kinds in snapshot.values())

    return StepMemTracker()
