"""`launch=multinode`: this node's `launch.nproc` ranks of a job over `launch.nnodes` nodes that meet at the c10d
rendezvous `launch.rdzv_endpoint` under the id `launch.rdzv_id` (torchrun's own protocol, no restarts).

The same command runs on every node. The nodes' ranks are assigned by the rendezvous; the node that gets node
rank 0 holds global rank 0, which gathers every rank's results through the process group and writes them into
*its* run folder (no shared filesystem needed), and only that node's controller records the row. A node whose
rendezvous never completed records its own failed row.
"""

from __future__ import annotations

import logging
import shutil
import socket
import uuid
from pathlib import Path

from bench.errors import positive_int, reject
from bench.launch import LaunchOutcome, Worker
from bench.launch.agent import address_towards, launch_config, run_ranks
from bench.launch.checks import check_visible_devices
from bench.launch.world import last_override
from bench.runfolder import COLLECTIVES, PIDS, RANKS, STACKS

log = logging.getLogger("bench.launch")

RUNS_HERE = False  # the other nodes' ranks run on their machines
SHARES_RUN_FOLDER = True  # every node's controller writes a folder of the same name (on a shared filesystem: one)

RECORDING_BACKEND = "bench-c10d"
_node_ranks: dict[str, int] = {}  # rendezvous id -> the rank this node got in its last rendezvous


def run_id(args: list[str], env) -> str | None:
    """The rendezvous id every node is given."""
    return last_override(args, "launch.rdzv_id")


def check(cfg: dict) -> None:
    launch = cfg["launch"]
    positive_int(cfg, "launch.nnodes")
    endpoint = launch["rdzv_endpoint"]
    host, _, port = str(endpoint).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        reject("launch.rdzv_endpoint", "host:port of the rendezvous store, e.g. node0.example:29500", endpoint)
    rdzv_id = launch["rdzv_id"]
    if rdzv_id is not None and not (isinstance(rdzv_id, (str, int)) and str(rdzv_id).strip()):
        reject("launch.rdzv_id", "a non-empty id shared by every node", rdzv_id)
    if launch["nnodes"] > 1 and rdzv_id is None:
        reject(
            "launch.rdzv_id",
            f"an id shared by the {launch['nnodes']} nodes and new for every run (e.g. $SLURM_JOB_ID) "
            "when launch.nnodes > 1",
            rdzv_id,
        )
    check_visible_devices(cfg)


def launch(cfg, run_dir: Path, worker: Worker) -> LaunchOutcome:
    keys = cfg["launch"]
    # only a one-node job may leave it unset; `launch.rdzv_id=42` reaches here as an int
    rdzv_id = str(keys["rdzv_id"]) if keys["rdzv_id"] is not None else f"bench-{uuid.uuid4().hex[:12]}"
    # Run folders are named after the rendezvous id, so a reused id finds the previous run's folder: drop what its
    # ranks left (results; pids, whose processes are gone and whose numbers other processes may have by now, and
    # which a deadline would signal; stacks and flight recorder dumps, which a deadline would read as this run's).
    # No rank of this run can have written yet: none starts before every node has joined.
    for folder in (RANKS, PIDS, STACKS, COLLECTIVES):
        shutil.rmtree(run_dir / folder, ignore_errors=True)
    _register_recording_backend()
    _node_ranks.pop(rdzv_id, None)
    config = launch_config(
        cfg,
        run_dir,
        min_nodes=keys["nnodes"],
        max_nodes=keys["nnodes"],
        run_id=rdzv_id,
        rdzv_backend=RECORDING_BACKEND,
        rdzv_endpoint=keys["rdzv_endpoint"],
        # read_timeout: how long to keep trying to reach the store (torch's default is 60 s whatever join_timeout)
        rdzv_configs={"join_timeout": keys["rdzv_timeout_s"], "read_timeout": keys["rdzv_timeout_s"],
                      **hosts_the_store(keys["rdzv_endpoint"].rpartition(":")[0])},
        # the stores this node serves listen on its address towards the others, not on every interface
        local_addr=address_towards(keys["rdzv_endpoint"].rpartition(":")[0]),
    )
    outcome = run_ranks(config, worker, run_dir, cfg, all_ranks_here=keys["nnodes"] == 1)
    node_rank = _node_ranks.pop(rdzv_id, None)
    if outcome.status == "failed" and outcome.failed_ranks and keys["nnodes"] > 1:
        outcome.detail = (
            "a rank on another node may have failed first (peers then lose their connection): see the other "
            "nodes' output and logs/rank<N>.log in their run folders"
        )
    if node_rank not in (0, None):
        outcome.records_row = False
        outcome.note = (
            f"node rank {node_rank} of {keys['nnodes']} ({outcome.status}); the row is recorded by the node "
            f"holding global rank 0, in its results_dir (run folder {run_dir.name})"
        )
    return outcome


def hosts_the_store(host: str) -> dict:
    """{"is_host": True} where the endpoint is an address of this machine that torch's own guess misses: torch
    hosts the rendezvous store where the endpoint is this machine's host name or an address that name resolves
    to, so with another of its addresses (an InfiniBand one; a network namespace's, launch/emulated-nodes.sh) no
    node hosted it and every node waited as a client until launch.rdzv_timeout_s, without a word. Else {}:
    torch's guess stands, and with it its second try as a client where two nodes of one machine both guess."""
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname

    try:
        ours = address_towards(host) == socket.gethostbyname(host)  # a route to an own address leaves from it
    except OSError:
        return {}
    return {"is_host": True} if ours and not _matches_machine_hostname(host) else {}


def _register_recording_backend() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(RECORDING_BACKEND, _create_recording_handler)


def _create_recording_handler(params):
    """torch's c10d rendezvous handler, wrapped to note the node rank this node gets (the agent keeps it to
    itself) and to keep a failed rendezvous shutdown at the end of a run from failing the run."""
    from torch.distributed.elastic.rendezvous import (
        RendezvousError,
        RendezvousHandler,
        RendezvousParameters,
        rendezvous_handler_registry,
    )

    inner = rendezvous_handler_registry.create_handler(
        RendezvousParameters(
            backend="c10d",
            endpoint=params.endpoint,
            run_id=params.run_id,
            min_nodes=params.min_nodes,
            max_nodes=params.max_nodes,
            local_addr=params.local_addr,
            **params.config,
        )
    )

    class RecordingHandler(RendezvousHandler):
        def get_backend(self) -> str:
            return RECORDING_BACKEND

        @property
        def use_agent_store(self) -> bool:
            return inner.use_agent_store

        def next_rendezvous(self):
            info = inner.next_rendezvous()
            _node_ranks[inner.get_run_id()] = info.rank
            return info

        def is_closed(self) -> bool:
            return inner.is_closed()

        def set_closed(self):
            return inner.set_closed()

        def num_nodes_waiting(self) -> int:
            # The agent asks this while its ranks run, to let new nodes join (bench never lets them: the world is
            # fixed). When the node hosting the store has ended, the question fails; the agent must then go on
            # watching its own ranks (they end by themselves, or report the lost peers) rather than give up.
            try:
                return inner.num_nodes_waiting()
            except RendezvousError:
                return 0

        def get_run_id(self) -> str:
            return inner.get_run_id()

        def shutdown(self) -> bool:
            try:
                return inner.shutdown()
            except Exception as exc:  # the node hosting the store may have left first: the run is over anyway
                log.warning("rendezvous shutdown failed (harmless once the ranks have ended): %s", exc)
                return False

    return RecordingHandler()
