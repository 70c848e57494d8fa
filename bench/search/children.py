"""The search's `python -m bench` children never outlive it, and a search never measures beside an earlier one's.

A search killed (SIGKILL, SIGTERM) used to leave its running `python -m bench` and that run's ranks behind; the
same command run at once then resumed beside them, and measured its next run 1.8x slower, with nothing on the row
to say so. Now each child is started

- in a session of its own (`start_new_session`: its own process group), so that the search stops the child and
  what it started in that group at once; a Ctrl-C at the terminal reaches the search alone, which then stops the
  child (`stop`: the same SIGINT, or SIGTERM when the search was sent one, which bench's controller turns into
  stopping its ranks and recording the run `interrupted`; SIGKILL once `GRACE_S` have passed or at a second
  Ctrl-C);
- with PR_SET_PDEATHSIG=SIGKILL (`die_with_parent`), so that a search killed outright takes its child along (the
  ranks already die with their controller: `bench.rank.runtime.die_with_parent`). A small helper (this module,
  run as `python -m bench.search.children <search pid> <command>`) sets it and execs the command, rather than a
  `preexec_fn`: the search's progress bar runs a thread, and Python's documentation warns that a `preexec_fn`
  in a process with threads may deadlock the child before its exec;
- with `MARK` in its environment, naming the search folder: every process below it inherits it, the ranks too
  (torch's agent starts them in sessions of their own, with a copy of the controller's environment). What the
  child leaves running is killed before the next run starts (`end_leftovers`), and a search refuses to start
  while a process of an earlier one in its folder still runs (`sole_search`), or while another search holds it.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

MARK = "BENCH_SEARCH_FOLDER"
# torch's agent gives its ranks 30 s after a SIGTERM before it kills them (`PContext.close(timeout=30)`); then the
# controller records the row
GRACE_S = 40.0
# how long a search waits for an earlier one's processes on their way out (a rank freeing its GPU memory after
# the SIGKILL its dead controller sent it) before it refuses to start
LEFTOVER_WAIT_S = 10.0
LOCK = "search.lock"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Busy(Exception):
    """Another search, or what an earlier one left running, holds the folder (the message says which, in one
    line)."""


class Stopped(KeyboardInterrupt):
    """The search was sent `signum` (SIGTERM, SIGHUP): it stops as at a Ctrl-C, its child first."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_stop_the_search() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Stopped` (Python's default for them is to die at once, leaving the child to
    run on); Ctrl-C raises KeyboardInterrupt already."""

    def stop(signum, frame):
        raise Stopped(signum)

    saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_child(command: list[str], log: IO, folder: Path) -> int:
    """Run `command` as the search's child (see the module's docstring), its output into `log`; its exit code.
    Whatever ends the search meanwhile (Ctrl-C, `Stopped`) stops the child first."""
    helper = [sys.executable, "-m", __name__, str(os.getpid()), *command]
    child = subprocess.Popen(helper, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, MARK: mark(folder)})
    try:
        return child.wait()
    except BaseException as exc:
        # a Ctrl-C used to reach the child too (one foreground process group): it still gets that SIGINT
        stop(child, signal.SIGINT if type(exc) is KeyboardInterrupt else signal.SIGTERM)
        raise
    finally:
        end_leftovers(folder)


def stop(child: subprocess.Popen, sig: int) -> None:
    """`sig` to the child's process group (bench's controller stops its ranks and records the run `interrupted`
    at SIGINT or SIGTERM), SIGKILL after `GRACE_S`, or at once at a second Ctrl-C or SIGTERM."""
    _signal_group(child.pid, sig)
    try:
        child.wait(timeout=GRACE_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    _signal_group(child.pid, signal.SIGKILL)  # what the child started in its group and left behind
    child.wait()


def _signal_group(pgid: int, sig: int) -> None:
    # the group's id is the child's pid, which cannot be reused while the group has a member left
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end_leftovers(folder: Path) -> None:
    """Kill the processes a child of this search left running (they carry `MARK`), and wait for them to go:
    the next run must not be measured beside them."""
    for pid in marked(folder):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _gone(folder, LEFTOVER_WAIT_S)


def mark(folder: Path) -> str:
    return str(Path(folder).resolve())


def marked(folder: Path) -> list[int]:
    """The live processes (of this user: others' environments are not readable) whose environment carries `MARK`
    for `folder`, this one left out."""
    wanted = f"{MARK}={mark(folder)}".encode()
    found = []
    if not Path("/proc").is_dir():  # not Linux: nothing to find by
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()  # empty for a zombie: it is gone already
        except OSError:
            continue
        if wanted in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _gone(folder: Path, wait_s: float) -> list[int]:
    """Wait up to `wait_s` for the processes marked for `folder` to end; those still there."""
    end = time.monotonic() + wait_s
    while (left := marked(folder)) and time.monotonic() < end:
        time.sleep(0.1)
    return left


@contextmanager
def sole_search(folder: Path) -> Iterator[None]:
    """This search alone in `folder`: `<folder>/search.lock` held (the kernel drops the lock when this process
    ends, however it ends; the children do not inherit it), and no process of an earlier search still running
    there (those on their way out are waited for). Raises `Busy` otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise Busy(f"expected no other search running in {folder}, got one (pid {holder}) holding "
                       f"{folder / LOCK}: wait for it to end, or stop it, then run the same command again") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        left = _gone(folder, LEFTOVER_WAIT_S)
        if left:
            raise Busy(f"expected no process of an earlier search in {folder} still running, got {len(left)} after "
                       f"{LEFTOVER_WAIT_S:.0f} s ({_described(left[0])}): wait for them to end, or end them (kill "
                       f"{' '.join(map(str, left))}), then run the same command again")
        yield
    finally:
        os.close(fd)


def _described(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = "?"
    return f"pid {pid}: {command[:120]}"


def die_with_parent(parent: int) -> bool:
    """Have Linux SIGKILL this process when `parent` ends (PR_SET_PDEATHSIG: kept across exec; it fires when the
    thread that started this process ends, and the search starts its children from its main thread). False when
    `parent` has ended already: this process was handed to another parent before the request, and nothing will
    come. Elsewhere than Linux, nothing is done."""
    if not sys.platform.startswith("linux"):
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return os.getppid() == parent


def _exec_as_child(argv: list[str]) -> None:
    """`<search pid> <command...>`: the command, in this process, dying with the search."""
    parent, command = int(argv[0]), argv[1:]
    if not die_with_parent(parent):
        sys.exit(f"bench.search: its search (pid {parent}) ended before this run started: not run")
    os.execv(command[0], command)


if __name__ == "__main__":
    _exec_as_child(sys.argv[1:])
