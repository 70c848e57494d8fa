#!/usr/bin/env bash
# launch/emulated-nodes.sh - two "nodes" on one machine, joined by a rate-limited link, for real.
#
# As root, on a Linux machine (CPU is enough):
#   launch/emulated-nodes.sh                       # 1 Gbit/s link, results in results/emulated-nodes
#   RATE=200mbit RESULTS=/tmp/en launch/emulated-nodes.sh
#
# What it does:
#   1. creates two network namespaces (bench-node0, bench-node1) joined by one veth pair (bench-v0 <-> bench-v1,
#      10.77.0.1 and 10.77.0.2, addresses that exist only inside those namespaces), each end shaped by
#      `tc qdisc ... tbf rate $RATE` (netem is not needed). Ranks on the same node talk over that node's own
#      address (the kernel's local path: fast); ranks on different nodes cross the shaped link.
#   2. python -m bench.comm: 2 ranks on one node (the intra-node fit), then 2 nodes x 2 ranks (the link).
#   3. python -m bench strategy=single: a rank's throughput, for the planner.
#   4. python -m bench.plan plan.network=measured plan.gpus_per_node=2 at 4 ranks: FSDP (4x1x1) against HSDP
#      (2*2x1x1: shard within a node, replicate across the link), predicted step time.
#   5. both layouts run for real, one node per namespace (launch=multinode), then
#      python -m bench.plan.check prints predicted against measured step time, and which layout wins.
# A trap always tears everything down (ranks, namespaces, veths), whatever happened.
#
# Environment: RATE (default 1gbit), RESULTS (default results/emulated-nodes), PYTHON (default python),
# MODEL_ARGS (default "model=gpt model.d_model=256 model.n_layers=4"), RUN_ARGS (default
# "steps=6 warmup=2 global_batch=8"), BURST (tbf burst, default 256kb), PORT (rendezvous port, default 29500).
set -euo pipefail

RATE=${RATE:-1gbit}
BURST=${BURST:-256kb}
RESULTS=${RESULTS:-results/emulated-nodes}
PYTHON=${PYTHON:-python}
PORT=${PORT:-29500}
MODEL_ARGS=${MODEL_ARGS:-model=gpt model.d_model=256 model.n_layers=4}
RUN_ARGS=${RUN_ARGS:-steps=6 warmup=2 global_batch=8}

NS=(bench-node0 bench-node1)
VETH=(bench-v0 bench-v1)
ADDR=(10.77.0.1 10.77.0.2)
TAG=en-$(date +%s)-$$     # rendezvous ids: new for every run

[ "$(id -u)" = 0 ] || { echo "emulated-nodes.sh: needs root (ip netns, tc)" >&2; exit 1; }
for ns in "${NS[@]}"; do
  if ip netns list | grep -qw "$ns"; then
    echo "emulated-nodes.sh: namespace $ns exists already (another run, or a leftover: ip netns del $ns)" >&2
    exit 1
  fi
done

teardown() {
  local ns pid
  set +e
  for ns in "${NS[@]}"; do
    # every process still inside one of our namespaces (ranks, agents): ours, since we made the namespace
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null; done
  done
  sleep 3
  for ns in "${NS[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null     # deletes the veth end inside it, and with it its peer
  done
  ip link del "${VETH[0]}" 2>/dev/null  # only if it never moved into its namespace
  echo "emulated-nodes.sh: torn down (namespaces ${NS[*]}, veth ${VETH[*]})"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# ---- 1. the two nodes and the link
ip netns add "${NS[0]}"
ip netns add "${NS[1]}"
ip link add "${VETH[0]}" type veth peer name "${VETH[1]}"
for i in 0 1; do
  ip link set "${VETH[$i]}" netns "${NS[$i]}"
  ip -n "${NS[$i]}" addr add "${ADDR[$i]}/24" dev "${VETH[$i]}"
  ip -n "${NS[$i]}" link set lo up
  ip -n "${NS[$i]}" link set "${VETH[$i]}" up
  ip netns exec "${NS[$i]}" tc qdisc add dev "${VETH[$i]}" root tbf rate "$RATE" burst "$BURST" latency 50ms
done
echo "== link: ${NS[0]} ${ADDR[0]} <-> ${NS[1]} ${ADDR[1]}, tbf rate $RATE burst $BURST on both ends"
ip netns exec "${NS[0]}" tc qdisc show dev "${VETH[0]}"
mkdir -p "$RESULTS"

# on node $1, with gloo (and tensorpipe) bound to that node's end of the link. Run in the background and waited
# for, so that the trap's INT/TERM is handled at once.
on_node() {
  local i=$1; shift
  ip netns exec "${NS[$i]}" env GLOO_SOCKET_IFNAME="${VETH[$i]}" TP_SOCKET_IFNAME="${VETH[$i]}" "$@" &
  wait $!
}

# the same command on both nodes (node1 in the background), as launch/multinode.sh would run it on two machines
both_nodes() {
  local id=$1; shift
  local common=(launch=multinode launch.nnodes=2 launch.nproc=2 launch.rdzv_endpoint="${ADDR[0]}:$PORT"
                launch.rdzv_id="$id" launch.omp_num_threads=1 results_dir="$RESULTS" progress=false)
  on_node 1 "$PYTHON" "$@" "${common[@]}" > "$RESULTS/$id.node1.log" 2>&1 &
  local other=$!
  local rc=0
  on_node 0 "$PYTHON" "$@" "${common[@]}" || rc=$?
  wait "$other" || rc=$?
  echo "   (node1's output: $RESULTS/$id.node1.log)"
  return $rc
}

COMM_ARGS=(comm.collectives=[all_reduce,all_gather,reduce_scatter,broadcast] comm.iters=10)

# ---- 2. the link, measured
echo "== bench.comm: 2 ranks on one node (intra-node)"
on_node 0 "$PYTHON" -m bench.comm launch=local launch.nproc=2 launch.omp_num_threads=1 results_dir="$RESULTS" \
  progress=false "${COMM_ARGS[@]}"
echo "== bench.comm: 2 nodes x 2 ranks (across the $RATE link)"
both_nodes "$TAG-comm" -m bench.comm "${COMM_ARGS[@]}"

# ---- 3. a rank's throughput (one rank, one thread, no network)
echo "== strategy=single: a rank's throughput for the planner"
on_node 0 "$PYTHON" -m bench strategy=single $MODEL_ARGS $RUN_ARGS launch.omp_num_threads=1 results_dir="$RESULTS" \
  progress=false

# ---- 4. the prediction
PLAN_ARGS=(strategy=fsdp $MODEL_ARGS $RUN_ARGS plan.world_sizes=[4] plan.gpus_per_node=2 plan.network=measured
           plan.strategies=[fsdp] plan.activation_checkpointing=[false] plan.calibrate=false
           launch.omp_num_threads=1 results_dir="$RESULTS")
echo "== bench.plan: FSDP against HSDP at 4 ranks, 2 per node, on the measured network"
"$PYTHON" -m bench.plan "${PLAN_ARGS[@]}" &
wait $!

# ---- 5. both layouts, for real
echo "== FSDP 4x1x1 across the two nodes"
both_nodes "$TAG-fsdp" -m bench strategy=fsdp $MODEL_ARGS $RUN_ARGS
echo "== HSDP 2*2x1x1 (shard within a node, replicate across the link)"
both_nodes "$TAG-hsdp" -m bench strategy=fsdp parallel.dp_replicate=2 $MODEL_ARGS $RUN_ARGS

echo "== predicted against measured"
# bench.plan.check matches the runs by their config (a multinode run's rdzv id and endpoint aside): launched
# with launch=multinode, as the runs were
"$PYTHON" -m bench.plan.check "${PLAN_ARGS[@]}" launch=multinode 2>&1 | grep '^|' &
wait $! || true
"$PYTHON" - "$RESULTS" "$TAG" "$RATE" <<'PY'
import csv, glob, json, os, sys
results, tag, rate = sys.argv[1:]
plan = max(glob.glob(f"{results}/plans/*/plan.csv"), key=os.path.getmtime)
predicted = {r["layout"]: float(r["predicted_step_ms"]) for r in csv.DictReader(open(plan))}
comm = [json.loads(l) for l in open(f"{results}/comm.jsonl")]
link = [r for r in comm if r.get("nnodes", 1) > 1 and r.get("run_id", "").startswith(tag)
        and r.get("collective") == "all_reduce" and r.get("status") == "ok"]
if link:
    big = max(link, key=lambda r: r["size_bytes"])
    print(f"link ({rate} tbf): bench.comm all_reduce busbw at {big['size_bytes'] >> 20} MiB, 4 ranks on 2 nodes: "
          f"{big['busbw_gbps']:.3f} GB/s = {8 * big['busbw_gbps']:.2f} Gbit/s")
measured = {}
for line in open(f"{results}/runs.jsonl"):
    r = json.loads(line)
    if r.get("status") == "ok" and str(r.get("run_id", "")).startswith(tag):
        name = "HSDP 2*2x1x1" if r["config"]["parallel"]["dp_replicate"] > 1 else "FSDP 4x1x1"
        measured[name] = r["step_time_ms_p50"]
for name, layout in (("FSDP 4x1x1", "4x1x1"), ("HSDP 2*2x1x1", "2*2x1x1")):
    m, p = measured.get(name), predicted.get(layout)
    err = f"{100 * (p / m - 1):+.0f}%" if m and p else "-"
    print(f"{name:13s} predicted {p:8.1f} ms   measured p50 {m if m is None else round(m, 1)} ms   error {err}")
if len(measured) == 2:
    pw = "FSDP 4x1x1" if predicted["4x1x1"] < predicted["2*2x1x1"] else "HSDP 2*2x1x1"
    mw = min(measured, key=measured.get)
    print(f"winner: predicted {pw}, measured {mw} ({'agree' if pw == mw else 'DISAGREE'})")
PY
