"""The memory-tracked step, in-process on a gloo group of one rank: a functional collective's tensors are counted
freed when the step drops them, not when the communication thread, a moment later, lets go of its references."""

import sys
import threading

import pytest
import torch
import torch.distributed as dist

from bench.measure.memory import peak_by_kind_mb
from bench.rank import tracked_step
from bench.rank.tracked_step import step_memory_tracker

MIB = 2**20


@pytest.fixture
def group():
    excepthook = sys.excepthook
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
    sys.excepthook = excepthook


class LaggingCommunication(torch.utils._python_dispatch.TorchDispatchMode):
    """Each all-gather's input and output held `lag_s` longer by another thread, as gloo's worker
    thread holds its work's tensors a moment after it marks the work done (on a loaded machine, a dozen
    operators of the step later); `lag_s=None` holds them to the end of the test."""

    def __init__(self, lag_s: float | None):
        super().__init__()
        self.lag_s, self.held = lag_s, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops._c10d_functional.all_gather_into_tensor.default:
            work = torch._C.ScriptList([args[0], out])  # references held in C++, as a gloo work's
            self.held.append(work)
            if self.lag_s is not None:
                threading.Timer(self.lag_s, self.held.remove, [work]).start()
        return out


def gathered_then_dropped(group, collectives: int = 1) -> None:
    """A MiB gathered (one rank: its copy), used and dropped, then a MiB allocated: the input and one more MiB
    held at a time."""
    x = torch.ones(256, 1024)
    for _ in range(collectives):
        gathered = torch.ops._c10d_functional.all_gather_into_tensor(x, 1, group.group_name)  # as DTensor's
        torch.ops._c10d_functional.wait_tensor(gathered).sum()
        del gathered
        torch.ones(256, 1024)


def test_a_collectives_tensors_are_freed_where_the_step_drops_them(group):
    tracker = step_memory_tracker()
    with LaggingCommunication(lag_s=0.3), tracker:
        gathered_then_dropped(group)
    # 3 where the gathered MiB was counted until the other thread let go
    assert peak_by_kind_mb(tracker.get_tracker_snapshot("peak"))["total"] == pytest.approx(2.0, abs=0.01)


def test_a_collective_held_for_good_stops_the_waiting_for_the_rest_of_the_step(group, monkeypatch, caplog):
    monkeypatch.setattr(tracked_step, "SETTLE_TIMEOUT_S", 0.05)
    tracker = step_memory_tracker()
    with LaggingCommunication(lag_s=None), tracker:
        gathered_then_dropped(group, collectives=3)
    (warning,) = [r.getMessage() for r in caplog.records if "still held" in r.getMessage()]
    assert "all_gather_into_tensor" in warning
    # the input, the three gathered (never let go) and the last MiB: the step ran on, counted as it happened
    assert peak_by_kind_mb(tracker.get_tracker_snapshot("peak"))["total"] == pytest.approx(5.0, abs=0.01)
