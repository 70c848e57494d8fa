"""Each layout's step time, predicted a priori: compute at a device throughput, plus the communication that
compute does not hide, plus the pipeline's bubble.

    step = compute + bubble + exposed communication

- compute: the step's hardware FLOPs on this rank (`bench.measure.flops`: forward and backward, recompute
  included; each of the world's ranks does 1/world of them) divided by the rank's throughput
  (`bench.plan.throughput`).
- communication: the step's collectives (traced by the simulation, `bench.plan.collectives`, or counted by the
  strategy, its `collectives` hook) priced by the network's alpha-beta fits (`bench.plan.network`). Where the
  strategy says its data-parallel communication overlaps compute (`OVERLAP`), a fraction `plan.overlap` of it is
  assumed hidden; tensor parallelism's collectives sit on the critical path between its matmuls and hide
  nothing, nor do a pipeline's sends, nor expert parallelism's all-to-alls, which the busiest rank's tokens
  make `plan.expert_load` (max over mean tokens per rank, 1: an even router) times as long (and its experts'
  compute, the step's FLOPs in the experts counted apart), nor a ring's
  (`strategy.cp_method=ring`), whose passes torch overlaps with each chunk's attention.
- bubble: the strategy's idle time as a multiple of its compute (its `bubble` hook: a pipeline of pp stages and
  m micro-batches idles (pp - 1) of its m + pp - 1 slots), and its point-to-point sends wait in every slot.
"""

from __future__ import annotations

from bench.plan.network import Network


def predict_step_ms(run, flops_per_sample: float, rank_tflops: float, collectives: list[dict], network: Network,
                    overlap: float, expert_load: float = 1.0, expert_flops_per_sample: float = 0.0) -> dict:
    """{compute_ms, comm_ms, comm_exposed_ms, bubble_ms, step_ms} for one step of `run` on the busiest rank."""
    load = expert_load if run.degrees.ep > 1 else 1.0  # a ring's passes (cp) are all-to-alls too, and even
    flops_per_sample += (load - 1) * expert_flops_per_sample  # the busiest rank's experts: load x the mean tokens
    compute_s = flops_per_sample * run.config["global_batch"] / run.world_size / (rank_tflops * 1e12)
    costs = [(c["collective"], network.call_s(c["collective"], c["ranks"], c["calls"], c["bytes"], c.get("span")))
             for c in collectives]
    bubble = run.strategy.bubble(run)
    sends = sum(cost for kind, cost in costs if kind == "p2p")
    exchanges = load * sum(cost for kind, cost in costs if kind == "all_to_all")
    others = sum(cost for kind, cost in costs if kind not in ("p2p", "all_to_all"))
    comm_s = sends * (1 + bubble) + exchanges + others
    exposed_s = comm_s - others * overlap if run.strategy.overlap else comm_s
    bubble_s = compute_s * bubble
    return {"compute_ms": 1e3 * compute_s, "comm_ms": 1e3 * comm_s, "comm_exposed_ms": 1e3 * exposed_s,
            "bubble_ms": 1e3 * bubble_s, "step_ms": 1e3 * (compute_s + bubble_s + exposed_s)}
