"""`python -m bench.search` run again: it reuses what it finished, whatever this machine's free memory reads now,
and it never measures beside a run it started before. The runs themselves are done in-process here (a finished
row appended as `python -m bench` would), except the stand-ins for a search and its child, which must be real
processes to be killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.configs import thaw
from bench.run import prepare
from conftest import compose_plain

# ----------------------------------------------------------------------------- a finished search, run again

REAL_POPEN = subprocess.Popen
FITS_PER_REPLICA = 40  # the fake runs' memory: a batch per replica above this runs out of it
SEARCH = ["model=mlp", "plan.world_sizes=[1]", "plan.strategies=[single]", "plan.activation_checkpointing=[false]",
          "plan.network=h100-nvlink-ib400", "plan.device_tflops=0.02", "global_batch=8", "search.top_k=1",
          "search.max_probes=4", "search.max_batch=256"]


class FinishedBench:
    """`python -m bench <overrides>` done in-process and at once: the row it would append (its resolved config,
    `ok` or `oom` by the batch per replica), no process started. Any other command runs for real."""

    launched: list[list[str]] = []
    pid = 2**22 + 1  # above any pid_max: never a real process or group, should anything signal it

    def __new__(cls, args, *rest, **kwargs):
        if not isinstance(args, (list, tuple)) or "bench" not in args:
            return REAL_POPEN(args, *rest, **kwargs)
        return super().__new__(cls)

    def __init__(self, args, *rest, **kwargs):
        self.args, self.returncode = args, 0
        overrides = list(args[args.index("bench") + 1:])
        FinishedBench.launched.append(overrides)
        run = prepare(compose_plain(*overrides))
        per_replica = run.config["global_batch"] // run.degrees.dp
        row = {"status": "ok" if per_replica <= FITS_PER_REPLICA else "oom", "config": thaw(run.config),
               "step_time_ms_p50": 1.0, "peak_mem_mb": 10.0 * per_replica, "samples_per_s_per_device": 100.0}
        with (Path(run.config["results_dir"]) / "runs.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")

    def wait(self, timeout=None):
        return 0

    poll = wait

    def communicate(self, *args, **kwargs):
        self.wait()
        return None, None

    def kill(self):
        pass

    terminate = kill

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def this_machine_has(monkeypatch, gb: float) -> None:
    """MemAvailable reads `gb` now (what `plan.device_memory_gb=null` plans for on a CPU)."""
    import bench.plan.memory

    monkeypatch.setattr(bench.plan.memory, "rank_memory_mb", lambda device, ranks: (
        gb * 1024 / ranks, f"{gb:.1f} GB available on this machine / {ranks} rank(s)"))


def test_a_finished_search_run_again_runs_nothing_though_free_memory_moved(tmp_path, monkeypatch, capsys):
    """The probes' memory limit once came from the moment's MemAvailable (11.361 GB, then 11.0965 GB): every
    probe's configuration differed on the second search, which ran them all again. The limit a search probes
    under is what it was asked to plan for: on this machine, the reading its first search recorded."""
    from bench.search.__main__ import main

    monkeypatch.setattr(subprocess, "Popen", FinishedBench)
    FinishedBench.launched = []
    args = [*SEARCH, f"results_dir={tmp_path}"]
    this_machine_has(monkeypatch, 11.361)
    assert main(args) == 0
    first = list(FinishedBench.launched)
    probes = [o for o in first if any(a.startswith("memory_limit_gb=") for a in o)]
    assert len(first) >= 3 and probes, first
    (frontier,) = [line for line in (tmp_path / "search" / "frontier.csv").read_text().splitlines()[1:]]
    capsys.readouterr()

    this_machine_has(monkeypatch, 11.0965)
    FinishedBench.launched = []
    assert main(args) == 0
    assert FinishedBench.launched == [], "a finished search run again runs nothing again"
    assert "0 run(s) launched, the rest reused" in capsys.readouterr().out
    assert (tmp_path / "search" / "frontier.csv").read_text().splitlines()[1:] == [frontier], "the same frontier"


# ----------------------------------------------------------------------------- a search stopped, run again


def test_a_search_sent_sigterm_stops_its_run_first_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """SIGTERM used to end the search at once (Python's default), its running `python -m bench` left to run on
    unseen. It now stops the run's process group first (SIGTERM: the controller stops its ranks), then ends
    as at a Ctrl-C, with the signal's exit code."""
    from bench.search.__main__ import main

    class RunningBench(FinishedBench):
        """A run that has not ended when the search is sent SIGTERM, and ends at the signal sent to its group."""

        def __init__(self, args, *rest, **kwargs):
            self.args, self.returncode, self.signalled = args, None, False

        def wait(self, timeout=None):
            if not self.signalled:
                self.signalled = True
                os.kill(os.getpid(), signal.SIGTERM)
            return -signal.SIGTERM

    def default_action(signum, frame):  # in place of dying, in this test's process
        raise RuntimeError("the search left SIGTERM to its default: it dies, its run left running")

    sent = []
    monkeypatch.setattr(subprocess, "Popen", RunningBench)
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: sent.append((pgid, sig)))
    previous = signal.signal(signal.SIGTERM, default_action)
    try:
        this_machine_has(monkeypatch, 11.361)
        assert main([*SEARCH, f"results_dir={tmp_path}"]) == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is default_action, "the search's handler is put back"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sent[0] == (RunningBench.pid, signal.SIGTERM), "the run's process group is stopped first"
    assert "bench.search: interrupted; the same command resumes" in capsys.readouterr().out


def test_a_search_refuses_to_start_beside_an_earlier_ones_run_or_another_search(tmp_path, monkeypatch, capsys):
    """A search run at once after one was killed resumed beside what the killed one had left running, and
    measured its run 1.8x slower, unflagged: every process below a search's run carries the search folder in its
    environment, and a search does not start while one of them runs (after a short wait for those on their way
    out), nor while another search holds the folder."""
    import fcntl

    from bench.search.__main__ import main

    try:  # the wait for processes on their way out, shortened (`bench.search.children`)
        import bench.search.children

        monkeypatch.setattr(bench.search.children, "LEFTOVER_WAIT_S", 0.3)
    except ImportError:
        pass
    monkeypatch.setattr(subprocess, "Popen", FinishedBench)
    FinishedBench.launched = []
    this_machine_has(monkeypatch, 11.361)
    args = [*SEARCH, f"results_dir={tmp_path}"]
    (tmp_path / "search").mkdir()
    left = REAL_POPEN(["sleep", "60"], env={**os.environ, "BENCH_SEARCH_FOLDER": str((tmp_path / "search").resolve())})
    try:
        assert main(args) == 2
    finally:
        left.kill()
        left.wait()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bench.search: expected no process of an earlier search in ") and f"kill {left.pid})" in line
    assert FinishedBench.launched == []

    with open(tmp_path / "search" / "search.lock", "a+") as other:  # another search, running
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bench.search: expected no other search running in ")
    assert FinishedBench.launched == []


# a search's run, and the run's rank, as real processes: the run is a stand-in for `python -m bench` (started,
# as every run, by the search's `sys.executable -m bench ...`), which starts a rank in a session of its own and
# stops it at SIGTERM, as torch's agent does; the rank dies with its parent, as bench's ranks do
# (`bench.rank.runtime.die_with_parent`)
STAND_IN_SEARCH = """
import sys, types
from pathlib import Path
try:
    from bench.search.runner import Runner
    from bench.search.children import signals_stop_the_search
except ImportError:  # before bench.search.runner
    from contextlib import nullcontext as signals_stop_the_search
    from bench.search.__main__ import Runner
folder, sys.executable = Path(sys.argv[1]), sys.argv[2]
with signals_stop_the_search():
    Runner(folder, []).run(types.SimpleNamespace(config={"model": "stand-in"}), [])
"""
STAND_IN_RUN = """
import os, signal, subprocess, sys, time
from pathlib import Path
folder = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("results_dir=")))
def stop(signum, frame):
    rank.terminate()
    rank.wait()
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
(folder / "run.pid").write_text(str(os.getpid()))
rank = subprocess.Popen([sys.executable, str(folder / "rank.py"), str(folder)], start_new_session=True)
time.sleep(60)
"""
STAND_IN_RANK = """
import ctypes, os, signal, sys, time
from pathlib import Path
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
if os.getppid() == 1:
    sys.exit(1)
(Path(sys.argv[1]) / "rank.pid").write_text(str(os.getpid()))
time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"  # a zombie has ended (this container's init may never reap it)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_search_killed_takes_its_run_and_the_runs_ranks_along(tmp_path, sig):
    """SIGKILL: the run dies with the search (PR_SET_PDEATHSIG), and its rank with it. SIGTERM: the search
    stops the run's process group first, which stops its rank. Before, both outlived the search."""
    python = tmp_path / "python"  # `-m bench` runs the stand-in; anything else (the search's helper) runs as is
    (tmp_path / "run.py").write_text(STAND_IN_RUN)
    (tmp_path / "rank.py").write_text(STAND_IN_RANK)
    python.write_text(f'#!/bin/sh\nif [ "$2" = bench ]; then exec {sys.executable} {tmp_path / "run.py"} "$@"; fi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    search = REAL_POPEN([sys.executable, "-c", STAND_IN_SEARCH, str(tmp_path), str(python)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        end = time.monotonic() + 60
        while not all((tmp_path / name).is_file() for name in ("run.pid", "rank.pid")):
            assert time.monotonic() < end and search.poll() is None, "the stand-in run never started"
            time.sleep(0.05)
        pids = [int((tmp_path / name).read_text()) for name in ("run.pid", "rank.pid")]
        search.send_signal(sig)
        search.wait(timeout=60)
        end = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.05)
        assert not [p for p in pids if alive(p)], "the run and its rank end with the search"
    finally:
        search.kill()
        search.wait()
        for pid in pids:  # what this test started, should it have outlived the search
            kill_if_started_here(pid, tmp_path)


def kill_if_started_here(pid: int, folder: Path) -> None:
    try:
        if alive(pid) and str(folder).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except OSError:  # gone meanwhile
        pass
