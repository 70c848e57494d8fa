"""What the controller learns about its ranks while they run, from the run folder.

- Teardown grace: once every rank of this launch has handed in its results, the run is measured; a rank that
  then hangs in teardown (gloo's destructors, a stuck barrier) is given `launch.teardown_grace_s`, not the rest
  of `timeout_s`, before the deadline fires and the ranks are stopped (the row stays `ok`, with a warning).
- Where a hung rank is: at the deadline, before any rank is stopped, each rank is asked (SIGUSR1) to write its
  Python stack and its flight recorder's collectives (`bench.rank.runtime.dump_stacks_on_request`); the row
  names where each one was and the last collective each one entered. Only a rank this controller started is
  asked (`rank_to_signal`): SIGUSR1 kills a process that does not handle it, and a `pids/` file may name a
  process that is no rank of this run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sysconfig
import threading
import time
from pathlib import Path

from bench.runfolder import PIDS, STACKS, handed_in, rank_file, rank_of, ranks_in

STACK_WAIT_S = 2.0
POLL_S = 0.2


class ResultsWatch(threading.Thread):
    """Re-arms the deadline to `grace_s` from the moment `expected` result files of launch `launch_id` are in."""

    def __init__(self, run_dir: Path, expected: int, launch_id: str | None, grace_s: float):
        super().__init__(daemon=True)
        self.run_dir, self.expected, self.launch_id, self.grace_s = run_dir, expected, launch_id, grace_s
        self.all_in = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(POLL_S):
            if handed_in(self.run_dir, self.launch_id) >= self.expected:
                remaining, _ = signal.getitimer(signal.ITIMER_REAL)
                if remaining > self.grace_s:
                    signal.setitimer(signal.ITIMER_REAL, self.grace_s)
                self.all_in.set()
                return


STACKS_SUFFIX, COLLECTIVES_SUFFIX = ".txt", "_collectives.json"


def collect_stacks(run_dir: Path) -> dict[str, str]:
    """Ask every rank that registered its pid for its stack and its collectives (one SIGUSR1:
    `bench.rank.runtime.dump_stacks_on_request`), wait for the files, and say where each one was:
    {rank: "function (file:line)"} for its main thread's innermost frame outside the standard library and torch."""
    asked = {}
    for pid_file in ranks_in(run_dir, PIDS):
        rank, pid = rank_of(pid_file), rank_to_signal(pid_file)
        try:
            if pid is not None:
                os.kill(pid, signal.SIGUSR1)
                asked[rank] = rank_file(run_dir, STACKS, rank, STACKS_SUFFIX)
        except OSError:  # gone already
            continue
    end = time.monotonic() + STACK_WAIT_S
    collectives = [rank_file(run_dir, STACKS, rank, COLLECTIVES_SUFFIX) for rank in asked]
    while time.monotonic() < end and not (all(_written(p) for p in asked.values())
                                          and all(p.exists() for p in collectives)):
        time.sleep(0.1)
    return {rank: where(path.read_text()) for rank, path in sorted(asked.items(), key=lambda kv: int(kv[0]))
            if _written(path)}


def pid_record(pid: int | None = None) -> str:
    """What a rank leaves in `pids/rank<N>`: its pid and its start time (`started_at`)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid} {started_at(pid)}"


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from its field 3 on (after the command name, which may hold spaces and parentheses)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def started_at(pid: int) -> str | None:
    """When the process started, in clock ticks since boot (field 22 of /proc/<pid>/stat): with its pid, it names
    one process, where a pid alone is handed to a new process once the old one is gone."""
    fields = _stat(pid)
    return fields[19] if fields else None


def rank_to_signal(pid_file: Path) -> int | None:
    """The pid a `pids/rank<N>` file holds, if the process that has that pid now is the rank that wrote it; else
    None.

    A launch with a reused `launch.rdzv_id` (multinode) reuses its run folder: a `pids/` file of the earlier run
    named a pid some other process had by the time of this run's deadline, and SIGUSR1 (which kills where it is
    not handled) went to it. So the process must be this controller's child (torch's agent, in this process,
    starts the ranks; a child's pid is not given to another process until its parent has reaped it), which
    also leaves out the ranks of other nodes sharing the folder; and it must have started when the file says
    (`pid_record`), or, for a file holding the pid alone, no later than the file was written."""
    try:
        words = pid_file.read_text().split()
        pid, written = int(words[0]), pid_file.stat().st_mtime
    except (OSError, ValueError, IndexError):
        return None
    fields = _stat(pid)
    if fields is None or len(fields) < 20 or int(fields[1]) != os.getpid():
        return None
    if len(words) > 1:
        return pid if words[1] == fields[19] else None
    return pid if _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK") <= written else None


def _boot_time() -> float:
    """This machine's boot, in seconds since the epoch (`btime` of /proc/stat: whole seconds, rounded down, so
    a process's start time from it is never later than the true one)."""
    with open("/proc/stat") as f:
        return float(next(line.split()[1] for line in f if line.startswith("btime ")))


def last_collectives(run_dir: Path) -> dict[str, str]:
    """{rank: its last collective, and whether it completed}, from the flight recorder dumps the ranks wrote when
    asked: the rank that is a collective behind the others is the one that never came."""
    last = {}
    for path in ranks_in(run_dir, STACKS, COLLECTIVES_SUFFIX):
        rank = rank_of(path, COLLECTIVES_SUFFIX)
        try:
            entries = json.loads(path.read_text()).get("entries") or []
        except (OSError, ValueError, AttributeError):
            continue
        if entries:
            entry = entries[-1]
            done = entry.get("retired") or entry.get("state") == "completed"
            group = (entry.get("process_group") or ["?", "?"])[1] or entry.get("pg_id")
            last[rank] = (f"{entry.get('profiling_name')} #{entry.get('collective_seq_id')} on {group}, "
                          f"{'completed' if done else 'not completed'}")
        else:
            last[rank] = "no collective recorded"
    return last


def _written(path: Path) -> bool:
    try:
        return "most recent call first" in path.read_text()
    except OSError:
        return False


FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


def where(stack: str) -> str:
    """The main thread's innermost frame in user or bench code (faulthandler lists the thread that took the
    signal, the main thread, as `Current thread`, most recent call first)."""
    current = stack.split("Current thread", 1)[-1]
    frames = [m.groupdict() for m in FRAME.finditer(current)]
    stdlib = sysconfig.get_paths()["stdlib"]
    for frame in frames:
        if "/torch/" not in frame["file"] and not frame["file"].startswith(stdlib):
            return f"{frame['func']} ({frame['file']}:{frame['line']})"
    return f"{frames[0]['func']} ({frames[0]['file']}:{frames[0]['line']})" if frames else "unknown"
