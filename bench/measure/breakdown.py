"""Where a step's time goes, from one rank's torch.profiler trace (the Chrome/Perfetto JSON that
`export_chrome_trace` writes), and which rank the others wait for. Pure: trace dicts in, dicts out.

Our own analysis rather than HolisticTraceAnalysis: HTA's temporal breakdown and communication/computation
overlap read GPU kernels on CUDA streams (`cat == "kernel"`), and a CPU/gloo trace has none, so it finds
nothing in the runs bench is tested on. The arithmetic is a few interval unions (`bench.measure.intervals`),
the same on both devices; only what counts as compute and as communication differs:

- CUDA: compute = the kernels, copies and memsets that are not NCCL's; communication = NCCL kernels. A
  step's kernels are those launched (by correlation id) inside its `ProfilerStep#k` range; its window runs
  from its first kernel to the next step's first (the last step's to its last kernel's end), so a gap on the
  device is idle time of the step that left it.
- CPU (gloo): compute = the operators (`cpu_op`) on the training thread (the one that ran `ProfilerStep#k`)
  outside collectives; communication = gloo's work on its own threads (`gloo:all_reduce`, ...) and the
  collective calls and waits on the training thread (`c10d::*`, `wait_tensor`). Operators, not the ranges
  around them, which hold the waits: a 5.1 ms `FSDP::pre_forward (1)` was seen holding a 4.2 ms
  `gloo:all_gather`. Autograd's `evaluate_function` ranges are left out for the same reason (they hold the
  node's hooks, FSDP's backward all-gathers among them); the node's own range inside them is counted.

A step's window is split into parts that sum to it exactly (C compute, M communication, D the data fetch,
marked `bench/data`):
    compute = |C|,  exposed communication = |M - C|,  data wait = |D - C - M|,  idle = window - |C u M u D|
and the communication hidden behind compute is |M n C| = |M| - exposed. On the CPU, idle is host time in
no operator (Python, dispatch, hooks).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

from bench.measure.intervals import Intervals, clip, intersect, length, subtract, union

DATA_MARK = "bench/data"  # the range around each profiled step's batch fetch (`bench.rank.profile`)
STEP_MARK = "ProfilerStep#"
COMM_PREFIXES = ("c10d::", "c10d_functional::", "_c10d_functional::", "gloo:", "nccl", "record_param_comms")
POINT_TO_POINT = ("c10d::send", "c10d::recv")
AUTOGRAD_NODE_RANGE = "autograd::engine::evaluate_function"  # holds a node's hooks (and their waits) too
PARTS_MS = ("compute_ms", "comm_ms", "comm_exposed_ms", "overlap_ms", "data_wait_ms", "idle_ms")


def load_trace(path: Path) -> dict:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def is_comm(name: str) -> bool:
    return name.startswith(COMM_PREFIXES) or "wait_tensor" in name


def is_collective_call(name: str) -> bool:
    """A rank entering a collective: the process group's own operator (`c10d::allreduce_`, which the
    functional `_c10d_functional::all_reduce` and DDP's buckets both go through), not its wait. Not a
    pipeline's send or recv: a stage waiting for its neighbour is the schedule's bubble, not a straggler."""
    return name.startswith("c10d::") and not name.startswith(POINT_TO_POINT)


# NCCL's kernels by name (ncclDevKernel_AllGather_RING_LL, ...): all-to-all and point-to-point are both SendRecv
NCCL_KINDS = (("allgather", "all_gather"), ("reducescatter", "reduce_scatter"), ("allreduce", "all_reduce"),
              ("sendrecv", "all_to_all or p2p"), ("broadcast", "broadcast"))


def collective_kind(name: str) -> str | None:
    """What a trace event does, where it is communication: gloo's work by its own name (`gloo:all_to_all`),
    NCCL's kernels by theirs; None for anything else."""
    if name.startswith("gloo:"):
        return name.removeprefix("gloo:")
    lowered = name.lower()
    if "nccl" in lowered:
        return next((kind for key, kind in NCCL_KINDS if key in lowered.replace("_", "")), "other")
    return None


def span(event: dict) -> tuple[float, float]:
    return event["ts"], event["ts"] + event["dur"]


def analyse(trace: dict) -> dict:
    """Per profiled step: its parts in ms (`PARTS_MS`, plus `step_ms`), and the collectives this rank entered
    as [name, unix time in µs] (for `stragglers`)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    # the host's ranges (CUDA traces repeat them on the device's timeline as `gpu_user_annotation`)
    marks = [e for e in events if e.get("cat") == "user_annotation"]
    steps = sorted((e for e in marks if e["name"].startswith(STEP_MARK)), key=lambda e: e["ts"])
    if not steps:
        raise ValueError(f"no {STEP_MARK} ranges in the trace: not a trace of profiled steps")
    host_windows = [span(s) for s in steps]
    data = union(span(e) for e in marks if e["name"] == DATA_MARK)
    on_device = any(e.get("cat") == "kernel" for e in events)
    if on_device:
        windows, compute, comm = device_activity(events, host_windows)
    else:
        windows = host_windows
        compute, comm = host_activity(events, steps[0]["tid"])
    base_us = trace.get("baseTimeNanoseconds", 0) / 1e3  # ts counts µs from here (kineto's traces)
    by_kind: dict[str, Intervals] = {}
    for e in events:  # on CUDA the device's kernels only: the host's ranges run on another timeline
        kind = collective_kind(e["name"])
        if kind and (not on_device or e.get("cat") in DEVICE_CATEGORIES):
            by_kind.setdefault(kind, []).append(span(e))
    return {
        "steps": [split_window(window, compute, comm, data)
                  | {"comm_by_collective_ms": {kind: length(clip(union(spans), window)) / 1e3
                                               for kind, spans in sorted(by_kind.items())}}
                  for window in windows],
        "collectives": collective_entries(events, host_windows, base_us),
    }


def host_activity(events: list[dict], main_tid) -> tuple[Intervals, Intervals]:
    """CPU/gloo: (compute, communication), see the module's docstring."""
    on_main = [e for e in events if e["tid"] == main_tid]
    calls = union(span(e) for e in on_main if is_comm(e["name"]))
    operators = union(
        span(e) for e in on_main
        if e.get("cat") == "cpu_op" and not is_comm(e["name"]) and not e["name"].startswith(AUTOGRAD_NODE_RANGE)
    )
    gloo_work = [span(e) for e in events if e["name"].startswith("gloo:")]
    return subtract(operators, calls), union([*gloo_work, *calls])


DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def device_activity(events: list[dict], host_windows: Intervals) -> tuple[Intervals, Intervals, Intervals]:
    """CUDA: (step windows on the device, compute, communication), see the module's docstring."""
    launched_at = {
        e["args"]["correlation"]: e["ts"] for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    per_step: list[list[dict]] = [[] for _ in host_windows]
    for work in (e for e in events if e.get("cat") in DEVICE_CATEGORIES):
        launch = launched_at.get(work.get("args", {}).get("correlation"))
        step = next((i for i, (s, e) in enumerate(host_windows) if launch is not None and s <= launch < e), None)
        if step is not None:
            per_step[step].append(work)
    firsts = [min(w["ts"] for w in step) if step else None for step in per_step]
    windows = []
    for i, step in enumerate(per_step):
        if not step:
            windows.append((0.0, 0.0))
            continue
        later = next((f for f in firsts[i + 1:] if f is not None), None)
        windows.append((firsts[i], later if later is not None else max(w["ts"] + w["dur"] for w in step)))
    device_work = [e for step in per_step for e in step]
    comm = [span(e) for e in device_work if "nccl" in e["name"].lower()]
    compute = [span(e) for e in device_work if "nccl" not in e["name"].lower()]
    return windows, union(compute), union(comm)


def split_window(window: tuple[float, float], compute: Intervals, comm: Intervals, data: Intervals) -> dict:
    """One step's window (µs) split into parts that sum to it, in ms."""
    c, m, d = clip(compute, window), clip(comm, window), clip(data, window)
    exposed = subtract(m, c)
    waiting_for_data = subtract(subtract(d, c), m)
    total = window[1] - window[0]
    busy = length(union([*c, *m, *d]))
    return {
        "step_ms": total / 1e3,
        "compute_ms": length(c) / 1e3,
        "comm_ms": length(m) / 1e3,
        "comm_exposed_ms": length(exposed) / 1e3,
        "overlap_ms": length(intersect(m, c)) / 1e3,
        "data_wait_ms": length(waiting_for_data) / 1e3,
        "idle_ms": (total - busy) / 1e3,
    }


def collective_entries(events: list[dict], windows: Intervals, base_us: float) -> list[list]:
    """Per step, the collectives this rank entered, in order: [name, unix µs]."""
    calls = sorted((e for e in events if is_collective_call(e["name"])), key=lambda e: e["ts"])
    return [[[e["name"], base_us + e["ts"]] for e in calls if start <= e["ts"] < end] for start, end in windows]


def stragglers(entries_by_rank: list[list[list]]) -> dict:
    """Which rank the others wait for: in each profiled step, the rank that entered most of the step's
    collectives last. A collective is matched across ranks by its name and its occurrence in the step (the
    k-th `c10d::allreduce_` of every rank that made k of them). Entry times are the ranks' wall clocks: on one
    host the same clock; across hosts they agree only as well as NTP keeps them, so lateness below the
    clocks' skew means nothing there.

    Fields: `straggler_rank` (last in the most steps), `straggler_share_pct` (of the profiled steps) and
    `straggler_late_ms` (how much later than the other ranks' mean it entered, averaged over the collectives
    it entered last); null where no collective was matched."""
    none = {"straggler_rank": None, "straggler_share_pct": None, "straggler_late_ms": None, "last_in": None}
    if len(entries_by_rank) < 2:
        return none
    steps = min(len(entries) for entries in entries_by_rank)
    step_stragglers, lateness = [], {}
    last_in = [[0] * steps for _ in entries_by_rank]  # per rank and step: collectives it entered last
    for step in range(steps):
        arrivals: dict[tuple, dict[int, float]] = {}
        for rank, entries in enumerate(entries_by_rank):
            seen: Counter = Counter()
            for name, t in entries[step]:
                arrivals.setdefault((name, seen[name]), {})[rank] = t
                seen[name] += 1
        for times in arrivals.values():
            if len(times) < 2:
                continue
            last = max(times, key=times.get)
            others = [t for r, t in times.items() if r != last]
            last_in[last][step] += 1
            lateness.setdefault(last, []).append((times[last] - sum(others) / len(others)) / 1e3)
        counts = [last_in[rank][step] for rank in range(len(entries_by_rank))]
        if max(counts) > 0:
            step_stragglers.append(max(range(len(counts)), key=lambda r: (counts[r], -r)))
    if not step_stragglers:
        return {**none, "last_in": last_in}
    rank, times = Counter(step_stragglers).most_common(1)[0]
    late = lateness[rank]
    return {
        "straggler_rank": rank,
        "straggler_share_pct": 100.0 * times / steps,
        "straggler_late_ms": sum(late) / len(late),
        "last_in": last_in,
    }


def breakdown_table(ranks: list[dict]) -> list[list]:
    """breakdown.csv's lines, header first: per rank and profiled step, the step's time by part (ms, summing to
    step_ms) and how many of its collectives the rank entered, and entered last (`stragglers`)."""
    last_in = stragglers([r["profile"]["collectives"] for r in ranks])["last_in"]
    lines: list[list] = [["rank", "step", "step_ms", *PARTS_MS, "collectives", "last_in"]]
    for i, r in enumerate(ranks):
        for step, (parts, entered) in enumerate(zip(r["profile"]["steps"], r["profile"]["collectives"], strict=True)):
            last = last_in[i][step] if last_in and step < len(last_in[i]) else ""
            lines.append([r["rank"], step, f"{parts['step_ms']:.4f}", *(f"{parts[k]:.4f}" for k in PARTS_MS),
                          len(entered), last])
    return lines


def breakdown_fields(steps_by_rank: list[list[dict]]) -> dict:
    """The row's share of the profiled steps' time by part (each rank's share over its steps, then the mean
    over ranks; `comm_exposed_pct_max`: the rank with the most), the share of communication hidden behind
    compute, and the profiled step's time (max over ranks, mean over steps)."""
    def share(steps: list[dict], part: str) -> float:
        total = sum(s["step_ms"] for s in steps)
        return 100.0 * sum(s[part] for s in steps) / total if total else 0.0

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    parts = {f"{part[:-3]}_pct": [share(steps, part) for steps in steps_by_rank] for part in PARTS_MS}
    comm_ms = sum(s["comm_ms"] for steps in steps_by_rank for s in steps)
    overlap_ms = sum(s["overlap_ms"] for steps in steps_by_rank for s in steps)
    per_step = zip(*([s["step_ms"] for s in steps] for steps in steps_by_rank), strict=False)
    return {
        "profile_steps": min(len(steps) for steps in steps_by_rank),
        "profile_step_time_ms": mean(max(step) for step in per_step),
        "compute_pct": mean(parts["compute_pct"]),
        "comm_pct": mean(parts["comm_pct"]),
        "comm_exposed_pct": mean(parts["comm_exposed_pct"]),
        "comm_exposed_pct_max": max(parts["comm_exposed_pct"]),
        "overlap_pct": 100.0 * overlap_ms / comm_ms if comm_ms else None,
        "profile_data_wait_pct": mean(parts["data_wait_pct"]),
        "idle_pct": mean(parts["idle_pct"]),
        "comm_by_collective_ms": by_collective(steps_by_rank),
    }


def by_collective(steps_by_rank: list[list[dict]]) -> dict[str, float]:
    """Each kind of collective's time in a profiled step (gloo's work, NCCL's kernels), the mean over ranks and
    steps, in ms: the all-gathers of FSDP and of context parallelism's keys and values, expert parallelism's
    all-to-alls, ..."""
    steps = [s.get("comm_by_collective_ms", {}) for ranks in steps_by_rank for s in ranks]
    kinds = sorted({kind for step in steps for kind in step})
    return {kind: sum(step.get(kind, 0.0) for step in steps) / len(steps) for kind in kinds} if steps else {}
