#!/usr/bin/env bash
# launch/multinode.sh - one bench job over several machines through torchrun's c10d rendezvous. Copy it and
# run it on EVERY node with the same settings (by hand, with pdsh/clush/ssh, or from a scheduler's script);
# the nodes find each other at RDZV_HOST:RDZV_PORT, and node ranks are assigned by the rendezvous:
#
#   # on node0 and on node1 (the same command on both):
#   NNODES=2 NPROC=8 RDZV_HOST=node0.example RDZV_ID=ddp-gpt-001 launch/multinode.sh strategy=ddp model=gpt
#
# Every argument is a bench override. RDZV_HOST must be an address of one of the nodes that every node can
# reach, RDZV_PORT a free TCP port there. RDZV_ID must be the same on every node and new for every run: it
# names the run folder, <results_dir>/multinode/<RDZV_ID>_<strategy>_<model>/, on each node.
# The node that holds global rank 0 appends the row to its <results_dir>/runs.jsonl (every rank's results
# reach it through the process group: no shared filesystem needed); the other nodes print a note instead.
# Each node keeps its own ranks' logs in its run folder (logs/rank<N>.log).
set -euo pipefail

: "${NNODES:?set NNODES, the number of machines}"
: "${NPROC:?set NPROC, ranks per machine (one per GPU)}"
: "${RDZV_HOST:?set RDZV_HOST, an address of one node that every node can reach}"
: "${RDZV_ID:?set RDZV_ID, an id shared by the nodes and new for every run}"
RDZV_PORT=${RDZV_PORT:-29500}
PYTHON=${PYTHON:-python}

# The environment bench is installed in:
# source ~/venvs/bench/bin/activate
# export NCCL_SOCKET_IFNAME=eth0      # the interface NCCL should use, if it picks the wrong one

exec "$PYTHON" -m bench launch=multinode launch.nnodes="$NNODES" launch.nproc="$NPROC" \
  launch.rdzv_endpoint="$RDZV_HOST:$RDZV_PORT" launch.rdzv_id="$RDZV_ID" "$@"
