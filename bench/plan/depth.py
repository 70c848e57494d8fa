"""A deep model's memory, simulated at a few depths and extrapolated to its own (`by_depth`), for
`bench.plan.memory`."""

from __future__ import annotations

# A deep model is simulated at a few depths and extrapolated, affine in the blocks, to its own: its blocks are
# identical, so each more holds, gathers and sends what one does, while a simulation's cost grows with the depth
# (a 70B Llama at 256 ranks was still simulating after 10 minutes). The peak is the largest of the step's moments
# (each phase's start and peak), each affine in the depth once the phase's peak stays where it is: a phase as long
# as a whole backward can peak at its start at 2 blocks and further on at 4 (FSDP 64 x 4 of a 70B Llama), so three
# depths, one block per stage apart, must agree on the slope (within SLOPE_TOLERANCE of the peak), else one block
# more is tried. A pipeline's phases are its schedule's work items, each a stage's pass over one micro-batch, whose
# memory runs affine from its start to its end: their moments are affine from one block a stage, and two depths
# are taken as they are (`checked=False`). From at least MIN_BLOCKS, a whole number in each of its stages (one,
# unless a pipeline cuts it). Measured against the whole model's simulation in docs/plan-and-search.md.
MIN_BLOCKS = 2
SLOPE_TOLERANCE = 0.01


def simulated_at_depths(model_cfg: dict) -> bool:
    """Whether a model's simulations are taken at a few depths (`by_depth`), a layout's seconds."""
    from bench.models import model_spec

    spec = model_spec(model_cfg)
    return spec.with_blocks is not None and MIN_BLOCKS + 2 < spec.depth(model_cfg)


def by_depth(simulate, run, stages: int, whole: bool = False, shallowest: bool = False, checked: bool = True) -> dict:
    """`simulate(run)`, or where the model is deep and not asked `whole`, simulated at depths one block per
    stage apart until three agree (two, not `checked`), and extrapolated from the last two (`depths` says which);
    whole where they do not agree before its depth. `shallowest`: the first depth's alone, a floor of the peak
    (each block more holds more), which tells a layout that cannot fit for a fraction of the simulations."""
    spec, model = run.model, run.config["model"]
    depth = spec.depth(model) if spec.with_blocks is not None and not whole else 0
    start = stages * max(1, -(-MIN_BLOCKS // stages))
    target = -(-depth // stages) * stages  # the first stages take the remainder: the largest stage, x stages
    points = 3 if checked else 2
    if shallowest and start + (points - 1) * stages < depth:
        return simulate(run.replace(model=spec.with_blocks(model, start))) | {"depths": f"{start} of {depth} blocks"}
    remainder = depth % stages  # the first stages take one block more than the others

    def fewer(moment: dict) -> int:
        """Blocks a stage fewer than the largest, where the moment's rank holds only stages past the remainder."""
        return int(remainder > 0 and min(moment.get("stages") or [0]) >= remainder)

    found = affine_in(lambda n: simulate(run.replace(model=spec.with_blocks(model, n))), start, stages, depth,
                      target, checked, fewer)
    if found is None:
        return simulate(run)
    memory, counts = found
    listed = ", ".join(map(str, counts[:-1])) + f" and {counts[-1]}"
    return memory | {"depths": f"{listed} of {depth} blocks, extrapolated"}


def affine_in(simulate_at, start: int, step: int, limit: int, target: int, checked: bool = True,
              fewer=lambda moment: 0) -> tuple[dict, tuple] | None:
    """A simulation affine in a count n (a model's blocks, a pipeline's micro-batches) once one moment holds the
    peak: `simulate_at(n)` at n = start, start + step, ... until three in a row agree on the slope (within
    SLOPE_TOLERANCE of the peak), extrapolated from the last two to `target` (a moment to `fewer(moment)` steps
    short of it), with the counts simulated; None where none agree below `limit`. Not `checked`: the first two,
    extrapolated as they are."""
    if not checked:
        if start + step >= limit:
            return None
        deeper = start + step
        return extrapolated(simulate_at(start), simulate_at(deeper), (target - start) / step, fewer), (start, deeper)
    at: dict[int, dict] = {}
    while start + 2 * step < limit:
        counts = tuple(start + k * step for k in range(3))
        for n in counts:
            if n not in at:
                at[n] = simulate_at(n)
        shallow, middle, deeper = (at[n] for n in counts)
        first, second = middle["total"] - shallow["total"], deeper["total"] - middle["total"]
        if abs(second - first) <= SLOPE_TOLERANCE * deeper["total"]:
            return extrapolated(middle, deeper, (target - counts[1]) / step, fewer), counts
        start += step
    return None


def extrapolated(shallow: dict, deeper: dict, t: float, fewer=lambda moment: 0) -> dict:
    """`shallow` + t x (`deeper` - `shallow`) for every count of MiB, and for the calls and bytes of each
    collective (by kind, group and span). The peak is the largest of the step's `moments` (each phase's start
    and peak: `bench.rank.tracked_step.step_memory_tracker`), each extrapolated alike (t - `fewer(moment)`: a pipeline
    rank whose stages are a block short of the largest, where the cut is uneven), where the two simulations have
    the same phases; else that of the moment the simulations peaked at. The moment that peaks moves with the
    depth: a one-stage GPipe of a 70B Llama peaks after its loss's gradient at 2 to 4 blocks, at its first
    backward from 80. (From t = 1 on, the largest moment holds at least the peaks' own extrapolation.)"""
    out = {k: v + t * (deeper[k] - v) for k, v in shallow.items() if isinstance(v, int | float)}
    if len(shallow.get("moments", ())) == len(deeper.get("moments", ())) > 0:
        moments = []
        for a, b in zip(shallow["moments"], deeper["moments"], strict=True):
            at = t - fewer(a)  # its own rank's depth
            moments.append({k: v + at * (b[k] - v) if isinstance(v, int | float) else v for k, v in a.items()})
        out |= {k: v for k, v in max(moments, key=lambda kinds: kinds["total"]).items() if k != "stages"}
        out["moments"] = moments
    calls: dict[tuple, list[dict]] = {}
    for which, memory in enumerate((shallow, deeper)):
        for c in memory.get("collectives", []):
            calls.setdefault((c["collective"], c["ranks"], c.get("span")), [None, None])[which] = c
    out["collectives"] = []
    for pair in calls.values():
        a, b = (c or {**(pair[0] or pair[1]), "calls": 0, "bytes": 0} for c in pair)
        out["collectives"].append({**a, "calls": a["calls"] + t * (b["calls"] - a["calls"]),
                                   "bytes": a["bytes"] + t * (b["bytes"] - a["bytes"])})
    return out
