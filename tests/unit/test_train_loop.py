"""The train loop's timing, in-process: per-step clocks, and a loop that never waits for the device mid-run."""

import itertools

import pytest
import torch

from bench.rank.train import EventClock, HostClock, train
from bench.strategies.base import Parallel


class FakeEvent:
    """Stands for torch.cuda.Event: `record` stamps a time read from a script; `elapsed_time` is in ms and may
    only be read once the device has been synchronised, as CUDA requires."""

    def __init__(self, clock: "FakeDevice"):
        self.device, self.time_s = clock, None

    def record(self) -> None:
        self.time_s = next(self.device.timeline)

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.device.synchronized, "event times read before the device was synchronised"
        return (end.time_s - self.time_s) * 1e3


class FakeDevice:
    def __init__(self, times: list[float]):
        self.timeline, self.synchronized, self.syncs = iter(times), False, 0

    def synchronize(self) -> None:
        self.synchronized, self.syncs = True, self.syncs + 1


def test_event_clock_reads_every_step_after_one_synchronisation():
    device = FakeDevice([0.0, 0.5, 0.5, 1.25, 2.0, 2.1])
    clock = EventClock(make_event=lambda: FakeEvent(device), synchronize=device.synchronize)
    for _ in range(3):
        clock.start()
        clock.stop()
    assert device.syncs == 0, "no synchronisation while steps are queued"
    assert clock.step_times_s() == pytest.approx([0.5, 0.75, 0.1])
    assert device.syncs == 1


def test_host_clock_times_each_step():
    clock = HostClock()
    clock.start()
    clock.stop()
    clock.start()
    clock.stop()
    (first, second) = clock.step_times_s()
    assert 0 <= first < 1 and 0 <= second < 1


class CountingParallel:
    """The strategy side of the loop, recording what the loop calls."""

    holds_loss = True

    def __init__(self):
        self.calls = []

    def zero_grad(self):
        self.calls.append("zero_grad")

    def forward_backward(self, x, y):
        self.calls.append("forward_backward")
        return torch.tensor(float(x.sum()))

    def optimizer_step(self):
        self.calls.append("optimizer_step")

    train_step = Parallel.train_step  # the real step, over the recording parts


def test_the_loop_times_every_step_and_copies_losses_once():
    parallel = CountingParallel()
    device = FakeDevice([float(t) for t in range(8)])
    clock = EventClock(make_event=lambda: FakeEvent(device), synchronize=device.synchronize)
    batches = itertools.cycle([(torch.ones(2), torch.zeros(2)), (torch.full((2,), 2.0), torch.zeros(2))])
    records = train(parallel, batches, 4, "cpu", clock=clock)
    assert parallel.calls == ["zero_grad", "forward_backward", "optimizer_step"] * 4
    assert records.step_time_s == [1.0] * 4 and records.timer == "cuda_events"
    assert records.loss == [2.0, 4.0, 2.0, 4.0] and len(records.data_wait_s) == 4
    assert device.syncs == 1


def test_adamw_takes_the_betas_and_eps_a_config_adds():
    """`+optim.betas=[0.9,0.95]` was checked and then dropped: AdamW ran with torch's (0.9, 0.999)."""
    from bench.parallel.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    given = build_optimizer(params, {"name": "adamw", "lr": 0.1, "weight_decay": 0.0, "betas": [0.9, 0.95],
                                     "eps": 1e-6})
    assert list(given.defaults["betas"]) == [0.9, 0.95]
    assert given.defaults["eps"] == 1e-6
    default = build_optimizer(params, {"name": "adamw", "lr": 0.1, "weight_decay": 0.0})
    assert tuple(default.defaults["betas"]) == (0.9, 0.999)
