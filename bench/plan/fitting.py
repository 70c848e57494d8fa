"""Whether a layout fits the device (`memory_verdict`): its floor, then its shallowest simulation, then its
prediction, each only where the one before leaves it open. `Simulations` gives the plan each layout's verdict,
worked out here or, once the layouts left would take a while (`Simulations`), ahead of the plan in worker processes,
one per core: the simulations of different layouts share nothing, and each takes seconds for a 70B model.

A worker is `python -m bench.plan.fitting`: one task a line on its standard input (the run's config and the
device's MiB, as JSON), one verdict a line back. Not multiprocessing's: its spawned children import the parent's
`__main__` again, which re-ran the plan of a script that calls `make_plan` unguarded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from bench.configs import thaw
from bench.plan.bound import floor_mb
from bench.plan.memory import predicted_memory_mb, shallowest_mb
from bench.run import Run

# Worker processes start (seconds each: torch and transformers imported again) once the layouts left would take
# this long here, at the pace of the one simulating: a small model's plan, every test's, is done before. They start
# while that one still simulates, so that they are ready when it is done (a 70B plan's first layout takes 4 s).
WORKERS_AFTER_S = 30.0
# A layout of a model simulated at a few depths (`bench.plan.depth`) takes at least this long: three depths of two
# blocks or more, each a third of a second or more here (a 70B Llama's layouts: 2 to 9 s). A plan of many such
# starts its workers as soon as it has listed them, so that they are ready for its first simulation.
DEEP_LAYOUT_S = 1.0
MOST_WORKERS = 8  # by default (`plan.workers=null`): at most this many, each holding its own torch (about 0.5 GB)


def memory_verdict(run: Run, device_mb: float) -> tuple[str, str, dict | None]:
    """(status: fits | does not fit | not predicted, its note, the memory: MiB by kind and `total`, and a
    simulation's `collectives`; the floor where that is all that was counted; None where nothing was)."""
    floor, shared = floor_mb(run)
    if floor and floor["total"] > device_mb:  # cannot fit whatever the step holds: not simulated
        return "does not fit", f"not simulated: at least {floor['total']:,.0f} MB ({shared})", floor
    shallow, at = shallowest_mb(run)
    if shallow is not None and shallow > device_mb:  # already too much with fewer blocks: no deeper ones
        return "does not fit", f"simulated at {at} only: already {shallow:,.0f} MB", None
    memory, why = predicted_memory_mb(run)
    if memory is None:
        return "not predicted", why, None
    return ("fits" if memory["total"] <= device_mb else "does not fit"), "", memory


class Worker:
    """One `python -m bench.plan.fitting` process and the layouts handed to it, in its order."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # bench where this process found it
        self.process = subprocess.Popen([sys.executable, "-m", "bench.plan.fitting"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.queued: list[int] = []

    def hand(self, key: int, run: Run, device_mb: float) -> None:
        self.process.stdin.write(json.dumps({"config": thaw(run.config), "device_mb": device_mb}) + "\n")
        self.process.stdin.flush()
        self.queued.append(key)

    def next_verdict(self) -> tuple[int, tuple | None]:
        """(The key of the oldest layout handed over, its verdict; None where the worker has died)."""
        key = self.queued.pop(0)
        line = self.process.stdout.readline()
        return key, tuple(json.loads(line)) if line else None

    def close(self) -> None:
        self.process.stdin.close()
        self.process.terminate()
        self.process.wait()


class Simulations:
    """Each layout's `memory_verdict`, asked in the plan's order (`verdict`). Where the layouts left would take
    WORKERS_AFTER_S (at the pace of the one simulating here, or `expect`ed so), `workers` processes start and the
    plan hands them the layouts it will ask next (`ahead`); each verdict is the same wherever it was worked out
    (simulations are deterministic, and cached on disk by what they depend on)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: list[Worker] = []
        self.started = False
        self.done: dict[int, tuple | None] = {}

    def __enter__(self) -> Simulations:
        return self

    def __exit__(self, *exc) -> None:
        for worker in self.pool:
            worker.close()

    def handed(self, key: int) -> bool:
        return key in self.done or any(key in w.queued for w in self.pool)

    def expect(self, layouts: int, deep: bool) -> None:
        """The workers started at once where `layouts` of a deep model (`deep`: simulated at a few depths) would
        take WORKERS_AFTER_S at DEEP_LAYOUT_S each."""
        if deep and not self.started and self.workers > 1 and layouts * DEEP_LAYOUT_S > WORKERS_AFTER_S:
            self.start()

    def ahead(self, upcoming) -> None:
        """Hand the workers the first of `upcoming` ((key, run, device MB), in the order the plan will ask)
        that none has yet, two to each at most."""
        for key, run, device_mb in upcoming:
            idle = min(self.pool, key=lambda w: len(w.queued), default=None)
            if idle is None or len(idle.queued) >= 2:
                return
            if not self.handed(key):
                idle.hand(key, run, device_mb)

    def verdict(self, key: int, run: Run, device_mb: float, left=lambda: 0) -> tuple[str, str, dict | None]:
        """The layout's verdict: a worker's where one has it (waited for), else worked out here (also where the
        worker died: out of memory). The workers start once this one has taken long enough that the layouts
        `left()` to simulate after it would take WORKERS_AFTER_S at its pace."""
        worker = next((w for w in self.pool if key in w.queued), None)
        while worker is not None and key not in self.done:
            done, verdict = worker.next_verdict()
            self.done[done] = verdict
            if verdict is None:  # and none of those queued after it
                self.done.update(dict.fromkeys(worker.queued))
                self.pool.remove(worker)
                worker.close()
                worker = None
        verdict = self.done.pop(key, None)
        if verdict is not None:
            return verdict
        later = left() if not self.started and self.workers > 1 else 0
        if not later:
            return memory_verdict(run, device_mb)
        timer = threading.Timer(WORKERS_AFTER_S / later, self.start)
        timer.start()
        try:
            return memory_verdict(run, device_mb)
        finally:
            timer.cancel()
            timer.join()  # the pool is read here only once the timer's thread is done with it

    def start(self) -> None:
        self.pool, self.started = [Worker() for _ in range(self.workers)], True


def serve() -> None:
    """A worker's loop: a verdict for each task read, in order, until its input closes."""
    import torch

    torch.set_num_threads(1)  # fake tensors compute nothing; the cores are the other workers'
    out = sys.stdout
    sys.stdout = sys.stderr  # whatever a model's code prints is not a verdict
    for line in sys.stdin:
        task = json.loads(line)
        out.write(json.dumps(memory_verdict(Run.of(task["config"]), task["device_mb"])) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
