"""The train loop: the same for every strategy, timed step by step without slowing the steps down.

On CUDA each step is timed by two events recorded on the stream, read once after the loop: the host keeps
queueing step k+1 while the device finishes step k, as in the user's own loop, and the device is synchronised
only at the edges of the loop. On the CPU the work is done when the call returns, so `perf_counter` at each
step's edges is the step's time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from bench.strategies.base import Parallel


@dataclass
class StepRecords:
    step_time_s: list[float] = field(default_factory=list)  # fetch + zero_grad + fwd + bwd + optimizer
    data_wait_s: list[float] = field(default_factory=list)  # host time spent waiting for the batch
    loss: list[float] | None = None  # None where this rank does not hold the loss
    timer: str = "perf_counter"


class HostClock:
    """Wall time at each step's edges: the step's work is done when its calls return (CPU)."""

    name = "perf_counter"

    def __init__(self):
        self.starts: list[float] = []
        self.ends: list[float] = []

    def start(self) -> None:
        self.starts.append(time.perf_counter())

    def stop(self) -> None:
        self.ends.append(time.perf_counter())

    def step_times_s(self) -> list[float]:
        return [end - start for start, end in zip(self.starts, self.ends, strict=True)]


class EventClock:
    """Device time between two events recorded on the current stream around each step (CUDA). Reading them
    needs the device to have reached them: `step_times_s` synchronises once, after the loop."""

    name = "cuda_events"

    def __init__(self, make_event: Callable = lambda: torch.cuda.Event(enable_timing=True),
                 synchronize: Callable[[], None] = torch.cuda.synchronize):
        self.make_event, self.synchronize = make_event, synchronize
        self.starts: list = []
        self.ends: list = []

    def _record(self, into: list) -> None:
        event = self.make_event()
        event.record()
        into.append(event)

    def start(self) -> None:
        self._record(self.starts)

    def stop(self) -> None:
        self._record(self.ends)

    def step_times_s(self) -> list[float]:
        self.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in zip(self.starts, self.ends, strict=True)]


def step_clock(device: str):
    return EventClock() if device.startswith("cuda") else HostClock()


def device_sync(device: str) -> Callable[[], None]:
    """What to call at the loop's edges so that no queued work spills into or out of the timed steps."""
    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def train(
    parallel: Parallel,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    device: str,
    on_step: Callable[[int], None] = lambda step: None,
    clock=None,
) -> StepRecords:
    clock = clock or step_clock(device)
    sync = device_sync(device)
    records = StepRecords(timer=clock.name)
    losses = []
    sync()
    for step in range(steps):
        clock.start()
        fetch_start = time.perf_counter()
        x, y = next(batches)
        records.data_wait_s.append(time.perf_counter() - fetch_start)
        loss = parallel.train_step(x, y)
        clock.stop()
        losses.append(loss)
        on_step(step)
    sync()
    records.step_time_s = clock.step_times_s()
    if parallel.holds_loss:
        # One device-to-host copy after the loop rather than a hidden sync inside every step.
        records.loss = torch.stack(losses).float().cpu().tolist()
    return records
