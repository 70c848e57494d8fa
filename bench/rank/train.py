"""The train loop: the same for every strategy, timed step by step."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from bench.strategies.parallel import Parallel


@dataclass
class StepRecords:
    step_time_s: list[float] = field(default_factory=list)  # fetch + zero_grad + fwd + bwd + optimizer, synced
    data_wait_s: list[float] = field(default_factory=list)  # the part spent waiting for the batch
    loss: list[float] | None = None  # None where this rank does not hold the loss


def device_sync(device: str) -> Callable[[], None]:
    """What to call at a timing edge so the clock sees finished work, not queued kernels."""
    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def train(
    parallel: Parallel,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    sync: Callable[[], None],
    on_step: Callable[[int], None] = lambda step: None,
) -> StepRecords:
    records = StepRecords()
    losses = []
    sync()
    for step in range(steps):
        start = time.perf_counter()
        x, y = next(batches)
        fetched = time.perf_counter()
        parallel.zero_grad()  # at the start, so the last step's gradients remain to be accounted for
        loss = parallel.forward_backward(x, y)
        parallel.optimizer_step()
        sync()
        end = time.perf_counter()
        records.step_time_s.append(end - start)
        records.data_wait_s.append(fetched - start)
        losses.append(loss)
        on_step(step)
    if parallel.holds_loss:
        # One device-to-host copy after the loop rather than a hidden sync inside every step.
        records.loss = torch.stack(losses).float().cpu().tolist()
    return records
