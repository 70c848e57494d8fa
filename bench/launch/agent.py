"""torchrun's agent, run inside the controller: start this node's ranks as `python -m <worker> <run_dir>`, watch
them, and say how they ended. Shared by `launch=local` and `launch=multinode`."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from bench.launch import LaunchOutcome, Worker, lost_a_peer
from bench.launch.process import RunTimeout, deadline, environment, rank_environment, restored_signal_handlers
from bench.launch.watch import ResultsWatch, collect_stacks, last_collectives
from bench.runfolder import LAUNCH_ID_ENV

SHUTDOWN_S = 3


def threads_per_rank(nproc: int, requested: int | None, env=os.environ) -> int | None:
    """The OMP_NUM_THREADS bench gives its ranks, exactly as torchrun would: what the user chose
    (`launch.omp_num_threads`), else whatever the environment already says (None: nothing to set), else 1
    per rank when several ranks share the node and nothing when there is one. Anything else would make bench's
    ranks run at another speed than the user's own `torchrun` (or plain `python`) would."""
    if requested is not None:
        return requested
    if "OMP_NUM_THREADS" in env or nproc == 1:
        return None
    return 1


def launch_config(cfg, run_dir: Path, **rendezvous):
    """torchrun's LaunchConfig for this node's `launch.nproc` ranks. The LaunchConfig defaults (etcd, 3
    restarts) are wrong for a benchmark: a run that silently restarts is not one run."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    fields = LaunchConfig.__dataclass_fields__
    # A stopped or stuck rank gets SIGKILL this long after SIGTERM (torch waits 30 s): the deadline holds
    shutdown = {"shutdown_timeout": SHUTDOWN_S} if "shutdown_timeout" in fields else {}
    return LaunchConfig(
        nproc_per_node=cfg["launch"]["nproc"],
        role="bench",
        max_restarts=0,
        monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=str(run_dir / "torchelastic")),
        **shutdown,
        **rendezvous,
    )


@contextmanager
def stores_listen_on_their_address():
    """Make the TCP stores torch's agent serves (the c10d rendezvous store, the store its ranks share) listen
    only on the address their host name resolves to, not on every interface as TCPStore does by default: the
    stores have no authentication and torch's rendezvous unpickles what it reads back. A one-node run names
    127.0.0.1 (loopback only); a multi-node run names `launch.rdzv_endpoint` and this node's address towards it.

    torch offers no bind address, only `master_listen_fd` (a socket already bound), so bench swaps in a
    TCPStore that binds one for the two places torch elastic creates its servers, while the agent starts."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    class BoundTCPStore(dist.TCPStore):
        def __init__(self, host_name, port, world_size=None, is_master=False, *args, **kwargs):
            if is_master and kwargs.get("master_listen_fd") is None:
                try:
                    kwargs["master_listen_fd"] = _listening_socket(host_name, port)
                except OSError as exc:  # as TCPStore itself fails: torch then joins the store as a client
                    raise RuntimeError(f"cannot listen on {host_name}:{port}: {exc}") from exc
            super().__init__(host_name, port, world_size, is_master, *args, **kwargs)

    saved = dist.TCPStore, c10d_rendezvous_backend.TCPStore
    dist.TCPStore = c10d_rendezvous_backend.TCPStore = BoundTCPStore
    try:
        yield
    finally:
        dist.TCPStore, c10d_rendezvous_backend.TCPStore = saved


def _listening_socket(host_name: str, port: int) -> int:
    """The file descriptor of a TCP socket listening on `host_name`'s address and `port` (0: any free port)."""
    address = socket.gethostbyname(host_name)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(socket.SOMAXCONN)
    return sock.detach()


def address_towards(host: str) -> str | None:
    """This machine's address on the route to `host` (no packet is sent: a UDP socket only picks a route);
    None when there is no route, and torch's own choice stands (the rendezvous will then say what failed)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(host), 9))
            return probe.getsockname()[0]
    except OSError:
        return None


def run_ranks(config, worker: Worker, run_dir: Path, cfg, all_ranks_here: bool = True) -> LaunchOutcome:
    """Run torchrun's agent until the ranks end, fail, time out or the controller is signalled.

    In every case but success the agent has stopped all ranks (SIGTERM, then SIGKILL) before this returns.
    `all_ranks_here`: every rank's results land in this node's run folder (one node), so teardown gets only a
    grace period once they are in (`bench.launch.watch`).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    launch = cfg["launch"]
    threads = threads_per_rank(launch["nproc"], launch["omp_num_threads"])
    stacks: dict[str, str] = {}
    watch = ResultsWatch(run_dir, launch["nproc"], os.environ.get(LAUNCH_ID_ENV), launch["teardown_grace_s"])

    def where_ranks_are() -> None:
        if not watch.all_in.is_set():
            stacks.update(collect_stacks(run_dir))

    with (environment(rank_environment(threads)), restored_signal_handlers(), stores_listen_on_their_address(),
          unreadable_error_files_read_as_none()):
        stop = signals_stop_the_agent()
        if all_ranks_here:
            watch.start()
        try:
            with deadline(cfg["timeout_s"], before_raising=where_ranks_are):
                elastic_launch(config, sys.executable)("-u", "-m", worker.module, str(run_dir))
        except ChildFailedError as exc:
            return failed_outcome(exc.failures)
        except RunTimeout:
            if watch.all_in.is_set():
                detail = (f"teardown did not end launch.teardown_grace_s={launch['teardown_grace_s']} s after every "
                          "rank had handed in its results: ranks stopped")
                return LaunchOutcome("timeout", detail=detail)
            detail = f"no end after timeout_s={cfg['timeout_s']}: every rank was stopped"
            if stacks:
                detail += "; ranks were in " + "; ".join(f"rank {r}: {at}" for r, at in stacks.items())
                detail += f" (stacks in {run_dir / 'stacks'})"
            collectives = last_collectives(run_dir)
            if collectives:
                detail += "; last collectives: " + "; ".join(f"rank {r}: {c}" for r, c in collectives.items())
                detail += f" (flight recorder dumps in {run_dir / 'collectives'})"
            return LaunchOutcome("timeout", detail=detail, extra_fields={"stuck_at": stacks or None,
                                                                          "stuck_collective": collectives or None})
        except SignalException as exc:
            name = signal.Signals(exc.sigval).name
            # torch's agent puts its own handler in place of ours just before it starts the ranks (PContext.start)
            done = "ranks stopped" if signal.getsignal(exc.sigval) is not stop else "before any rank started"
            return LaunchOutcome("interrupted", detail=f"controller received {name}: {done}", signal=exc.sigval)
        except RendezvousError as exc:
            # e.g. the other nodes never came (wrong endpoint or id, not started): no rank of this node ran
            detail = f"rendezvous failed, no rank started: {type(exc).__name__}: {' '.join(str(exc).split())}"
            if launch["nnodes"] > 1:
                detail += (
                    f" (the store at launch.rdzv_endpoint={launch['rdzv_endpoint']}, within "
                    f"launch.rdzv_timeout_s={launch['rdzv_timeout_s']}: is that host reachable from here, is the "
                    f"node it names running, and are the other {launch['nnodes'] - 1} node(s) running the same "
                    "command with the same launch.rdzv_id?)"
                )
            return LaunchOutcome("failed", detail=detail[:1000])
        finally:
            watch.stop.set()
    return LaunchOutcome("ok")


def signals_stop_the_agent():
    """Make SIGINT and SIGTERM raise torch's SignalException from now on, as they do once torch's agent has started
    the ranks (`PContext.start` installs that handler): a Ctrl-C that landed before, during the rendezvous, was a
    KeyboardInterrupt (a SIGTERM killed the controller) that nothing turned into a row. The agent shuts down
    whatever it started either way; `restored_signal_handlers` puts the controller's handlers back. Returns the
    handler, which is still in place only if torch never started a rank."""
    from torch.distributed.elastic.multiprocessing import SignalException

    def stop(signum, frame):
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    return stop


@contextmanager
def unreadable_error_files_read_as_none():
    """A rank that cannot write its error file (a full disk) leaves it empty or cut off, and torch's agent reads
    it with json.load the moment the rank exits (`ProcessFailure.__post_init__`): its JSONDecodeError came out of
    `elastic_launch` and ended the controller with no row. Read such a file as none: the failure stands, with
    the rank's exit code and what was wrong with its file."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    original = ProcessFailure.__post_init__

    def tolerant(failure) -> None:
        problem = _error_file_problem(failure)
        if problem is None:
            original(failure)
            return
        how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
        failure.error_file_data, failure.timestamp = {"message": ""}, int(time.time())
        failure.message = (f"{how}; its error file {failure.error_file} could not be read ({problem}): the rank "
                           "may have been unable to write it (a full disk?)")

    ProcessFailure.__post_init__ = tolerant
    try:
        yield
    finally:
        ProcessFailure.__post_init__ = original


def _error_file_problem(failure) -> str | None:
    """What keeps torch from reading a rank's error file (empty, not JSON, no message), or None: none there, or
    a whole one (read as torch reads it)."""
    if not os.path.isfile(failure.error_file):
        return None
    try:
        with open(failure.error_file) as f:
            failure._get_error_data(json.load(f))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def failed_outcome(failures: dict) -> LaunchOutcome:
    """The ranks that failed, the cause first: the earliest failure that is not a rank losing its peer."""
    described = {rank: _describe(failure) for rank, failure in failures.items()}
    order = sorted(failures, key=lambda r: (lost_a_peer(described[r]), failures[r].timestamp))
    detail = None
    if all(lost_a_peer(described[r]) for r in order):
        # torch's agent can see a peer's error before the exit of the rank that caused it, and then stops that
        # rank itself: its own exit is never reported
        detail = ("every failure reported is a rank losing its peer: the rank that left first (an exit without "
                  "an error, a kill) is in no report; see logs/rank<N>.log")
    return LaunchOutcome("failed", failed_ranks={r: described[r] for r in order}, detail=detail)


def _describe(failure) -> str:
    """A failed rank in one line: the exception message its error file recorded, else its exit code."""
    message = failure.message
    if isinstance(message, dict):  # the worker's @record error file
        message = message.get("message") or str(message)
    if not message or message.startswith("To enable traceback"):
        message = f"exited with code {failure.exitcode}"
    return " ".join(str(message).split())[:1000]
