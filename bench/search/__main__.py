"""`python -m bench.search [overrides]`: the layouts `bench.plan` predicts fastest, run for real, and each of
their strategies' largest batch that fits, found by real runs.

1. The plan (`bench.plan`, same keys): every layout's predicted memory and step time.
2. The `search.top_k` fastest predicted layouts that fit run as `python -m bench` runs would
   (`predicted_step_time_ms` set, so each row holds the prediction beside the measurement).
3. The frontier (`search.frontier`): for each strategy among them, the largest batch per replica that fits in
   a rank's memory (`plan.device_memory_gb`, or this machine's as the folder's first search read it:
   `bench.search.runner.probe_memory_mb`), by bisection over short real runs under `memory_limit_gb`
   (`bench.search.frontier`); the runs that ran out of memory keep their `oom` rows.

Every run lands in `<results_dir>/search/runs.jsonl`. A search run again (after Ctrl-C, or with a larger
top_k) reuses every run already finished there with the same configuration (`bench.configs`: `bench.search.runner`).
Its runs never outlive it, and it refuses to start while another search, or a run an earlier one left, still
runs in the folder (`bench.search.children`). The end:
`search.csv` (each run, predicted against measured), `frontier.csv`, `prediction_error.png`, and the best
configuration measured (`bench.search.output`).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from bench.errors import PlanError
from bench.plan.layouts import layout_config, refusal
from bench.plan.memory import predicted_memory_mb
from bench.plan.setup import Planning, prepare_plan
from bench.plan.table import Planned, make_plan
from bench.run import Run
from bench.search.children import Busy, signals_stop_the_search, sole_search
from bench.search.frontier import find_frontier
from bench.search.output import measured_line, report
from bench.search.runner import Runner, probe_memory_mb

# what the search sets for each run; the user's other overrides (model, precision, optim...) pass through
OWN_KEYS = ("plan.", "search.", "strategy", "launch.nproc", "parallel.", "global_batch", "activation_checkpointing",
            "grad_accum", "steps", "warmup", "force", "results_dir", "memory_limit_gb", "predicted_step_time_ms")
USAGE = """usage: python -m bench.search [KEY=VALUE ...]

The layouts python -m bench.plan predicts fastest, run for real, and each one's largest batch that fits. Every
key of python -m bench.plan applies, and:
  search.top_k=3          the predicted-fastest layouts that fit, run for real
  search.frontier=true    for each of their strategies, the largest batch per replica that fits, by bisection
  search.max_probes=6     real runs per strategy's frontier at most
  search.steps=12 search.warmup=4   each run's length
Runs land in <results_dir>/search/runs.jsonl; the same command resumes from them. With plan.device_memory_gb=null
the frontier probes under this machine's memory as the folder's first search read it (search/device_memory.json)."""


def run_overrides(run: Run) -> list[str]:
    """The command line `python -m bench` gets for `run` (besides the user's own overrides)."""
    cfg, degrees = run.config, run.degrees
    out = [f"strategy={run.strategy.name}", f"launch.nproc={run.nproc}", *(f"parallel.{k}={v}" for k, v in
           degrees.as_dict().items()), f"activation_checkpointing={cfg['activation_checkpointing']}",
           f"grad_accum={cfg['grad_accum']}", f"global_batch={cfg['global_batch']}", f"steps={cfg['steps']}",
           f"warmup={cfg['warmup']}", "force=true"]  # predicted here already
    # the layout's own knobs (a plan's variants of them, `bench.strategies`)
    out += [f"strategy.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in cfg["strategy"].items() if k != "name" and not isinstance(v, dict | list)]
    if cfg.get("memory_limit_gb") is not None:
        out.append(f"memory_limit_gb={cfg['memory_limit_gb']}")
    return out


def top_layouts(planned: list[Planned], k: int) -> list[Planned]:
    fits = [p for p in planned if p.status == "fits" and p.predicted_step_ms is not None]
    return sorted(fits, key=lambda p: -p.predicted_tokens_per_s_per_device)[:k]


def at_batch(planning: Planning, line: Planned, batch: int) -> Run | None:
    """The layout's run at `batch` per replica, None where bench would refuse it."""
    cfg = layout_config(planning.base, planning.knobs[line.layout.strategy], line.layout,
                        global_batch=batch * line.layout.degrees.dp)
    return None if refusal(cfg) else Run.of(cfg)


def predicted_peak_mb(planning: Planning, line: Planned, batch: int) -> float | None:
    """The layout's predicted peak per rank at `batch` per replica (cached: `bench.plan.memory`); inf where
    bench would refuse that batch, None where its memory is not predicted."""
    run = at_batch(planning, line, batch)
    if run is None:
        return float("inf")
    predicted, _ = predicted_memory_mb(run)
    return None if predicted is None else predicted["total"]


def batch_unit(line: Planned) -> int:
    """What a replica's batch must be a multiple of: the strategy's unit (a pipeline's micro-batches) for each of
    its accumulation steps."""
    return line.layout.grad_accum * line.run.strategy.batch_unit(line.run)


def predicted_frontier(planning: Planning, line: Planned, unit: int, limit_mb: float, max_batch: int) -> int:
    """The largest batch per replica (a multiple of `unit`) predicted to fit in `limit_mb`: doubling from the
    layout's, then bisecting; the layout's own where the strategy's memory is not predicted."""
    start = max(unit, line.micro_batch * line.layout.grad_accum // unit * unit)
    if predicted_peak_mb(planning, line, start) is None:
        return start
    found = find_frontier(lambda b: predicted_peak_mb(planning, line, b) <= limit_mb, start, unit, max_batch,
                          max_probes=24)
    return found["fits"] or unit


def prediction(line: Planned, global_batch: int, peak_mb: float | None = None, timed: bool = True) -> dict:
    layout = line.layout
    return {"strategy": layout.strategy, "world_size": layout.world, "layout": layout.label,
            "activation_checkpointing": layout.activation_checkpointing, "global_batch": global_batch,
            "predicted_step_ms": line.predicted_step_ms if timed else None,
            "predicted_peak_mb": peak_mb if not timed else (line.memory or {}).get("total"),
            "predicted_per_device": line.predicted_tokens_per_s_per_device if timed else None}


def frontier(planning: Planning, pick: Planned, runner: Runner, lines: list[dict]) -> dict:
    search = planning.search
    limit_mb, limit_from = probe_memory_mb(runner.folder, pick, planning.plan["device_memory_gb"] is not None)
    unit = batch_unit(pick)
    dp = pick.layout.degrees.dp
    start = predicted_frontier(planning, pick, unit, limit_mb, search["max_batch"])

    def probe(batch: int) -> bool | None:
        run = at_batch(planning, pick, batch)
        if run is None:
            return None
        run = run.replace(steps=3, warmup=1, memory_limit_gb=float(f"{limit_mb / 1024:.6g}"))
        row = runner.run(run, run_overrides(run))
        peak = predicted_peak_mb(planning, pick, batch)
        lines.append(measured_line(row, prediction(pick, batch * dp, peak, timed=False), "frontier"))
        status = (row or {}).get("status")
        return True if status == "ok" else False if status == "oom" else None

    found = find_frontier(probe, start, unit, search["max_batch"], search["max_probes"])
    return {"strategy": pick.layout.strategy, "world_size": pick.layout.world, "layout": pick.layout.label,
            "memory_limit_mb": limit_mb, "memory_limit_from": limit_from, "predicted_max_batch_per_replica": start,
            "measured_max_batch_per_replica": found["fits"], "first_oom_batch_per_replica": found["oom"],
            "probes": len(found["probes"])}


def main(argv: list[str] | None = None) -> int:
    from bench.plan.__main__ import print_config, wants_help

    overrides = sys.argv[1:] if argv is None else argv
    if wants_help(overrides, USAGE) or print_config(overrides, "search"):
        return 0
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        planning = prepare_plan(overrides, "search")
        if not planning.network.measured:  # the search ranks layouts by their predicted step time
            raise PlanError(planning.network.source)
    except Exception as exc:  # PlanError, or what Hydra cannot compose: one line
        print(f"bench.search: invalid config: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    search = planning.search
    folder = Path(planning.base["results_dir"]) / "search"
    runner = Runner(folder, [o for o in overrides if not o.lstrip("+~").startswith(OWN_KEYS)])
    picks = top_layouts(make_plan(planning), search["top_k"])
    if not picks:
        console.print("bench.search: no layout is predicted to fit with a predicted step time: nothing to run")
        return 1
    try:
        with sole_search(folder), signals_stop_the_search():
            lines, frontiers = run_all(planning, picks, runner, console)
    except Busy as exc:  # another search, or an earlier one's run, would be measured beside this one's
        print(f"bench.search: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (`Stopped`): the running child stopped first
        console.print(f"bench.search: interrupted; the same command resumes, reusing the finished runs in {folder}")
        return 128 + getattr(exc, "signum", signal.SIGINT)
    return report(lines, frontiers, folder, console, runner.launched)


def run_all(planning: Planning, picks: list[Planned], runner: Runner, console: Console) -> tuple[list, list]:
    """The top layouts' runs, then each of their strategies' frontier: (their lines, the frontiers)."""
    search, lines, frontiers = planning.search, [], []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("top layouts", total=len(picks))
        for pick in picks:
            progress.update(task, description=f"{pick.layout.strategy} {pick.layout.degrees.label} on "
                                              f"{pick.layout.world}")
            run = pick.run.replace(steps=search["steps"], warmup=search["warmup"],
                                   predicted_step_time_ms=round(pick.predicted_step_ms, 3))
            row = runner.run(run, [*run_overrides(run), f"predicted_step_time_ms={pick.predicted_step_ms:.3f}"])
            lines.append(measured_line(row, prediction(pick, run.config["global_batch"]), "top"))
            progress.advance(task)
        if search["frontier"]:
            strategies = list(dict.fromkeys(p.layout.strategy for p in picks))
            task = progress.add_task("frontier", total=len(strategies))
            for pick in (next(p for p in picks if p.layout.strategy == s) for s in strategies):
                progress.update(task, description=f"frontier of {pick.layout.strategy} {pick.layout.degrees.label}")
                frontiers.append(frontier(planning, pick, runner, lines))
                progress.advance(task)
    return lines, frontiers


if __name__ == "__main__":
    sys.exit(main())
