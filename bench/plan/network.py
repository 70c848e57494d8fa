"""What one collective call costs: the alpha-beta model, t = latency + factor * bytes / busbw, with nccl-tests'
bus-bandwidth factor (`bench.measure.bandwidth`: all-reduce 2(n-1)/n, all-gather and reduce-scatter
(n-1)/n, broadcast and point-to-point 1).

The two numbers come from one of:
- `plan.network=measured`: fitted to this cluster's `python -m bench.comm` rows (`<results_dir>/comm.jsonl`)
  on the same device and backend, one fit per collective and world size, on one node (within a node) and
  across nodes where such rows exist. Fitted in relative error, so that the small
  messages set the latency and the large ones the bandwidth. A row that cannot be fitted (`comm_row_problem`:
  a key missing, a wrong type, a time or size NaN, infinite or <= 0) is skipped with a warning naming its file
  and line; a collective measured at fewer than `MIN_SIZES` message sizes is not fitted, with a warning.
- a preset, `plan.network=<name>` (`plan.networks.<name>` in conf/plan.yaml): a node type's link rates, with
  their source.

Assumed: a collective within one node uses the intra-node fit, one whose ranks span nodes (the ranks from
rank 0 to its group's highest, `span`, more than a node holds) runs at the inter-node one (its slowest link);
a collective over a number of ranks not measured takes the fit of the most ranks measured below it (latency
and busbw stay as measured when the world grows past what was measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import PlanError, is_integer
from bench.measure.bandwidth import busbw_factor
from bench.plan.rows import planner_rows, warn_once
from bench.results import is_number


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

    def call_s(self, collective: str, ranks: int, calls: float, size_bytes: float, span: int | None = None) -> float:
        """Seconds for `calls` calls of `collective` over `ranks` ranks moving `size_bytes` in all; `span` the
        consecutive ranks from rank 0 its group reaches (None: `ranks`)."""
        if ranks <= 1 or calls == 0:
            return 0.0
        links = self.inter if self.crosses_nodes(span or ranks) and self.inter else self.intra
        by_ranks = links.get(collective) or links.get(FALLBACK.get(collective, "")) or links["*"]
        # the fit at this many ranks, else at the most ranks measured below it, else at the fewest above
        below = [n for n in by_ranks if n <= ranks]
        link = by_ranks[max(below) if below else min(by_ranks)]
        factor = 1.0 if collective == "p2p" else busbw_factor(collective, ranks)
        return calls * link.latency_us * 1e-6 + factor * size_bytes / (link.busbw_gbps * 1e9)


    def crosses_nodes(self, span: int) -> bool:
        return span > self.gpus_per_node


# a collective bench.comm does not time, priced as the one that moves data the same way
FALLBACK = {"p2p": "broadcast", "all_to_all": "all_gather"}


def preset(name: str, spec: dict) -> Network:
    return Network(name, spec["source"], spec["gpus_per_node"],
                   intra={"*": {2: Link(**spec["intra_node"])}}, inter={"*": {2: Link(**spec["inter_node"])}})


# The collectives a comm row may time: those with a bus-bandwidth factor (`bench.measure.bandwidth`).
FITTED = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
# A fit has two unknowns, the latency and the bandwidth: fewer message sizes than this cannot tell them apart
# (one size gave a step 113x the one fitted from 13 sizes: the least-squares minimum-norm answer, not a fit).
MIN_SIZES = 2


def comm_row_problem(row: dict) -> str | None:
    """Why a comm.jsonl row cannot be fitted, or None: `status` text; in an `ok` row, `device_name`, `backend` and
    `collective` (one of `FITTED`) text, `world_size` a whole number >= 2, `nnodes` (if given) >= 1, and
    `size_bytes` and `time_us` finite numbers > 0. A row that is not `ok` (a collective the backend lacks) is
    never fitted, so nothing else of it is read."""
    if not isinstance(row.get("status"), str):
        return f"{given(row, 'status')}, expected text"
    if row["status"] != "ok":
        return None
    for key in ("device_name", "backend", "collective"):
        if not isinstance(row.get(key), str):
            return f"{given(row, key)}, expected text"
    if row["collective"] not in FITTED:
        return f"{given(row, 'collective')}, expected one of {', '.join(FITTED)}"
    for key, least in (("world_size", 2), ("nnodes", 1)):
        value = row.get(key, 1 if key == "nnodes" else None)  # a row without nnodes ran on one node (`measured`)
        if not (is_integer(value) and value >= least):
            return f"{given(row, key)}, expected a whole number >= {least}"
    for key in ("size_bytes", "time_us"):  # a time or size <= 0 fitted a negative bandwidth: a step of -9.5 ms
        value = row.get(key)
        if not (is_number(value) and math.isfinite(value) and value > 0):
            return f"{given(row, key)}, expected a finite number > 0"
    return None


def given(row: dict, key: str) -> str:
    """What the row holds at `key`, for a warning: "no time_us", or "time_us is nan"."""
    return f"{key} is {row[key]!r}" if key in row else f"no {key}"


def measured(results_dir: str | Path, device_name: str, backend: str, gpus_per_node: int | None) -> Network:
    """Fits of this machine's `python -m bench.comm` rows on `device_name` over `backend`; rows that cannot be
    fitted are skipped, each with one warning (`comm_row_problem`)."""
    path = Path(results_dir) / "comm.jsonl"
    rows = [row for row in planner_rows(path, comm_row_problem) if row["status"] == "ok"
            and row["device_name"] == device_name and row["backend"] == backend]
    one_node = [r for r in rows if r.get("nnodes", 1) == 1]
    across = [r for r in rows if r.get("nnodes", 1) > 1]
    intra = fit_all(one_node or rows, path)
    if not intra:
        raise NotMeasured(
            f"plan.network: expected `python -m bench.comm` results for {device_name} over {backend} in {path}, "
            f"each collective at {MIN_SIZES} message sizes or more, got {'none' if not rows else 'none that fits'}. "
            "Run `python -m bench.comm launch.nproc=<ranks>` first, or name a preset "
            "(`plan.network=h100-nvlink-ib400`, plan.networks in conf/plan.yaml).")
    widest = max(r["world_size"] for r in (one_node or rows))
    inter = fit_all(across, path)
    source = f"bench.comm on {device_name} ({backend}), {widest} ranks on one node"
    if inter:
        source += f", {max(r['world_size'] for r in across)} ranks across nodes"
    return Network("measured", source, gpus_per_node or widest, intra=intra, inter=inter)


def fit_all(rows: list[dict], path: Path) -> dict[str, dict[int, Link]]:
    """One fit per collective and world size measured at `MIN_SIZES` message sizes or more (the others: one
    warning each, naming `path`); {} where none is."""
    fits: dict[str, dict[int, Link]] = {}
    for collective, world in sorted({(r["collective"], r["world_size"]) for r in rows}):
        points = [(r["size_bytes"] * busbw_factor(collective, world), r["time_us"])
                  for r in rows if r["collective"] == collective and r["world_size"] == world]
        sizes = len({x for x, _ in points})
        link = fit(points) if sizes >= MIN_SIZES else None
        if link is None:
            why = (f"{sizes} message size measured, a latency and a bandwidth need {MIN_SIZES} or more (bench.comm "
                   "times each power of two from comm.min_bytes to comm.max_bytes)" if sizes < MIN_SIZES else
                   "its sizes and times are too far apart to fit in floating point")
            warn_once(f"{path}: {collective} over {world} ranks not fitted: {why}")
            continue
        fits.setdefault(collective, {})[world] = link
    if fits:
        fits["*"] = fits.get("all_reduce") or next(iter(fits.values()))
    return fits


def fit(points: list[tuple[float, float]]) -> Link | None:
    """latency + x / busbw through (bus bytes x > 0, time in us > 0), least squares in relative error; None where
    the numbers are too far apart for floating point to fit (an overflow, or least squares not converging)."""
    import numpy as np

    x, t = np.array(points, dtype=float).T
    with np.errstate(all="ignore"):
        design = np.stack([np.ones_like(x), x], axis=1) / t[:, None]
        try:
            (latency_us, us_per_byte), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
        except np.linalg.LinAlgError:
            return None
        if not us_per_byte > 0:  # too few or too noisy sizes to see a bandwidth: the largest message's
            us_per_byte = t[np.argmax(x)] / x.max()
        busbw_gbps = float(1e-3 / us_per_byte) if us_per_byte > 0 else math.inf
    if not (math.isfinite(latency_us) and math.isfinite(busbw_gbps) and busbw_gbps > 0):
        return None
    return Link(latency_us=max(float(latency_us), 0.0), busbw_gbps=busbw_gbps)


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
