"""What one collective call costs: the alpha-beta model, t = latency + factor * bytes / busbw, with nccl-tests'
bus-bandwidth factor (`bench.measure.bandwidth`: all-reduce 2(n-1)/n, all-gather and reduce-scatter
(n-1)/n, broadcast and point-to-point 1).

The two numbers come from one of:
- `plan.network=measured`: fitted to this cluster's `python -m bench.comm` rows (`<results_dir>/comm.jsonl`)
  on the same device and backend, one fit per collective and world size, on one node (within a node) and
  across nodes where such rows exist. Fitted in relative error, so that the small
  messages set the latency and the large ones the bandwidth.
- a preset, `plan.network=<name>` (`plan.networks.<name>` in conf/plan.yaml): a node type's link rates, with
  their source.

Assumed: a collective within one node uses the intra-node fit, one whose ranks span nodes runs at the
inter-node one (its slowest link); a collective over a number of ranks not measured takes the fit of the most
ranks measured below it (latency and busbw stay as measured when the world grows past what was measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import PlanError
from bench.measure.bandwidth import busbw_factor
from bench.results import rows_if_any


class NotMeasured(PlanError):
    """`plan.network=measured` with no `python -m bench.comm` rows: memory can still be planned, step time not."""


@dataclass
class Link:
    latency_us: float
    busbw_gbps: float


@dataclass
class Network:
    name: str
    source: str
    gpus_per_node: int
    intra: dict[str, dict[int, Link]]  # collective (or "*": any) -> {ranks measured: its fit} within a node
    inter: dict[str, dict[int, Link]] = field(default_factory=dict)  # the same across nodes
    measured: bool = True  # False: no fits at all (no bench.comm rows): no step time can be priced

    def call_s(self, collective: str, ranks: int, calls: float, size_bytes: float) -> float:
        """Seconds for `calls` calls of `collective` over `ranks` ranks moving `size_bytes` in all."""
        if ranks <= 1 or calls == 0:
            return 0.0
        links = self.inter if ranks > self.gpus_per_node and self.inter else self.intra
        by_ranks = links.get(collective) or links.get(FALLBACK.get(collective, "")) or links["*"]
        # the fit at this many ranks, else at the most ranks measured below it, else at the fewest above
        below = [n for n in by_ranks if n <= ranks]
        link = by_ranks[max(below) if below else min(by_ranks)]
        factor = 1.0 if collective == "p2p" else busbw_factor(collective, ranks)
        return calls * link.latency_us * 1e-6 + factor * size_bytes / (link.busbw_gbps * 1e9)


# a collective bench.comm does not time, priced as the one that moves data the same way
FALLBACK = {"p2p": "broadcast", "all_to_all": "all_gather"}


def preset(name: str, spec: dict) -> Network:
    return Network(name, spec["source"], spec["gpus_per_node"],
                   intra={"*": {2: Link(**spec["intra_node"])}}, inter={"*": {2: Link(**spec["inter_node"])}})


def measured(results_dir: str | Path, device_name: str, backend: str, gpus_per_node: int | None) -> Network:
    """Fits of this machine's `python -m bench.comm` rows on `device_name` over `backend`."""
    path = Path(results_dir) / "comm.jsonl"
    rows = [row for row in rows_if_any(path) if row.get("status") == "ok" and row.get("device_name") == device_name
            and row.get("backend") == backend and row.get("time_us")]
    if not rows:
        raise NotMeasured(
            f"plan.network: expected `python -m bench.comm` results for {device_name} over {backend} in {path}, "
            "got none. Run `python -m bench.comm launch.nproc=<ranks>` first, or name a preset "
            "(`plan.network=h100-nvlink-ib400`, plan.networks in conf/plan.yaml).")
    one_node = [r for r in rows if r.get("nnodes", 1) == 1]
    across = [r for r in rows if r.get("nnodes", 1) > 1]
    intra = fit_all(one_node or rows)
    widest = max(r["world_size"] for r in (one_node or rows))
    source = f"bench.comm on {device_name} ({backend}), {widest} ranks on one node"
    if across:
        source += f", {max(r['world_size'] for r in across)} ranks across nodes"
    return Network("measured", source, gpus_per_node or widest, intra=intra, inter=fit_all(across) if across else {})


def fit_all(rows: list[dict]) -> dict[str, dict[int, Link]]:
    """One fit per collective and world size measured."""
    fits: dict[str, dict[int, Link]] = {}
    for collective, world in sorted({(r["collective"], r["world_size"]) for r in rows}):
        points = [(r["size_bytes"] * busbw_factor(collective, world), r["time_us"])
                  for r in rows if r["collective"] == collective and r["world_size"] == world]
        fits.setdefault(collective, {})[world] = fit(points)
    fits["*"] = fits.get("all_reduce") or next(iter(fits.values()))
    return fits


def fit(points: list[tuple[float, float]]) -> Link:
    """latency + x / busbw through (bus bytes x, time in us), least squares in relative error."""
    import numpy as np

    x, t = np.array(points, dtype=float).T
    design = np.stack([np.ones_like(x), x], axis=1) / t[:, None]
    (latency_us, us_per_byte), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    if us_per_byte <= 0:  # too few or too noisy sizes to see a bandwidth: the largest message's
        us_per_byte = t[np.argmax(x)] / x.max()
    return Link(latency_us=max(float(latency_us), 0.0), busbw_gbps=float(1e-3 / us_per_byte))


def load_network(plan: dict, results_dir: str | Path, device_name: str, backend: str) -> Network:
    name = plan["network"]
    if name == "measured":
        return measured(results_dir, device_name, backend, plan["gpus_per_node"])
    presets = plan.get("networks") or {}
    if name not in presets:
        raise PlanError(f"plan.network: expected measured or one of {', '.join(sorted(presets))} (plan.networks), "
                        f"got {name!r}. Change `plan.network=` on the command line.")
    network = preset(name, presets[name])
    if plan["gpus_per_node"]:
        network.gpus_per_node = plan["gpus_per_node"]
    return network
