"""`python -m bench.search [overrides]`: the layouts `bench.plan` predicts fastest, run for real, and each of
their strategies' largest batch that fits, found by real runs.

1. The plan (`bench.plan`, same keys): every layout's predicted memory and step time.
2. The `search.top_k` fastest predicted layouts that fit run as `python -m bench` runs would
   (`predicted_step_time_ms` set, so each row holds the prediction beside the measurement).
3. The frontier (`search.frontier`): for each strategy among them, the largest batch per replica that fits in
   a rank's memory (`plan.device_memory_gb`, or this machine's), by bisection over short real runs under
   `memory_limit_gb` (`bench.search.frontier`); the runs that ran out of memory keep their `oom` rows.

Every run lands in `<results_dir>/search/runs.jsonl`. A search run again (after Ctrl-C, or with a larger
top_k) reuses every run already finished there with the same configuration. The end: `search.csv` (each run,
predicted against measured), `frontier.csv`, `prediction_error.png`, and the best configuration measured.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.plan.__main__ import plan_lines, prepare_plan
from bench.plan.memory import predicted_memory_mb
from bench.plan.network import PlanError
from bench.results import rows_if_any
from bench.search.frontier import find_frontier

FINISHED = ("ok", "oom", "failed", "skipped")
# what the search sets for each run; the user's other overrides (model, precision, optim...) pass through
OWN_KEYS = ("plan.", "search.", "strategy", "launch.nproc", "parallel.", "global_batch", "activation_checkpointing",
            "grad_accum", "steps", "warmup", "force", "results_dir", "memory_limit_gb", "predicted_step_time_ms")
IDENTITY = ("model", "data", "precision", "compile", "optim", "seed")


def run_overrides(line: dict, global_batch: int, steps: int, warmup: int) -> list[str]:
    dp, tp, pp = (int(v) for v in line["layout"].split("x"))
    checkpointing = bool(line["activation_checkpointing"])
    return [f"strategy={line['strategy']}", f"launch.nproc={line['world_size']}", f"parallel.dp={dp}",
            f"parallel.tp={tp}", f"parallel.pp={pp}", f"activation_checkpointing={checkpointing}",
            f"grad_accum={line['grad_accum']}", f"global_batch={global_batch}", f"steps={steps}", f"warmup={warmup}",
            "force=true"]  # predicted here already


def same_run(row: dict, base: dict, overrides: list[str]) -> bool:
    """Whether a row ran the configuration these overrides make of `base`."""
    config = row.get("config")
    if not isinstance(config, dict):
        return False
    wanted = dict(o.split("=", 1) for o in overrides)
    parallel = config.get("parallel") or {}
    return (config.get("strategy", {}).get("name") == wanted["strategy"]
            and str(config.get("launch", {}).get("nproc")) == wanted["launch.nproc"]
            and all(str(parallel.get(k)) == wanted[f"parallel.{k}"] for k in ("dp", "tp", "pp"))
            and str(config.get("activation_checkpointing")) == wanted["activation_checkpointing"]
            and str(config.get("grad_accum")) == wanted["grad_accum"]
            and str(config.get("global_batch")) == wanted["global_batch"]
            and str(config.get("memory_limit_gb")) == wanted.get("memory_limit_gb", "None")
            and all(config.get(k) == base.get(k) for k in IDENTITY))


class Runner:
    """Runs `python -m bench` for a configuration unless `<folder>/runs.jsonl` holds it finished already."""

    def __init__(self, folder: Path, base: dict, user: list[str]):
        self.folder, self.base, self.user = folder, base, user
        self.launched = 0

    def rows(self) -> list[dict]:
        return rows_if_any(self.folder / "runs.jsonl")

    def run(self, overrides: list[str]) -> dict | None:
        done = [r for r in self.rows() if r.get("status") in FINISHED and same_run(r, self.base, overrides)]
        if done:
            return done[-1]
        self.launched += 1
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"run{len(list(logs.iterdir()))}.txt").open("w") as log:
            log.write(" ".join(["python -m bench", *self.user, *overrides]) + "\n")
            log.flush()
            subprocess.run([sys.executable, "-m", "bench", *self.user, *overrides, f"results_dir={self.folder}",
                            "progress=false"], stdout=log, stderr=subprocess.STDOUT, check=False)
        mine = [r for r in self.rows() if same_run(r, self.base, overrides)]
        if mine and mine[-1].get("status") == "interrupted":
            raise KeyboardInterrupt
        return mine[-1] if mine else None


def top_layouts(table: pd.DataFrame, k: int) -> list[dict]:
    fits = table[(table["status"] == "fits") & table["predicted_step_ms"].notna()]
    fits = fits.sort_values("predicted_tokens_per_s_per_device", ascending=False, kind="stable")
    return fits.head(k).to_dict("records")


def predicted_peak_mb(base: dict, knobs: dict, line: dict, batch: int) -> float | None:
    """The layout's predicted peak per rank at `batch` per replica (cached: `bench.plan.memory`); inf where
    bench would refuse that batch, None where the strategy's memory is not predicted."""
    from bench.plan.layouts import layout_config, refusal

    dp, tp, pp = (int(v) for v in line["layout"].split("x"))
    cfg = layout_config({**base, "global_batch": batch * dp}, knobs[line["strategy"]], {"dp": dp, "tp": tp, "pp": pp},
                        bool(line["activation_checkpointing"]), line["grad_accum"], line["world_size"] // line["nodes"])
    if refusal(cfg):
        return float("inf")
    predicted = predicted_memory_mb(cfg)
    return None if predicted is None else predicted["total"]


def predicted_frontier(base: dict, knobs: dict, line: dict, unit: int, limit_mb: float, max_batch: int) -> int:
    """The largest batch per replica (a multiple of `unit`) predicted to fit in `limit_mb`: doubling from the
    layout's, then bisecting; the layout's own where the strategy's memory is not predicted."""
    start = max(unit, line["micro_batch"] * line["grad_accum"] // unit * unit)
    if predicted_peak_mb(base, knobs, line, start) is None:
        return start
    found = find_frontier(lambda b: predicted_peak_mb(base, knobs, line, b) <= limit_mb, start, unit, max_batch,
                          max_probes=24)
    return found["fits"] or unit


def batch_unit(base: dict, knobs: dict, line: dict) -> int:
    """What a replica's batch must be a multiple of: its micro-batches (pipeline) and accumulation steps."""
    unit = line["grad_accum"]
    if line["strategy"] == "pipeline":
        unit *= knobs["pipeline"]["microbatches"]
    return unit


def measured_line(row: dict | None, predicted: dict, kind: str) -> dict:
    row = row or {}
    line = {"kind": kind, **predicted, "status": row.get("status", "not run"), "run_dir": row.get("run_dir"),
            "measured_step_ms": row.get("step_time_ms_p50"), "measured_peak_mb": row.get("peak_mem_mb"),
            "measured_per_device": row.get("tokens_per_s_per_device") or row.get("samples_per_s_per_device")}
    for what in ("step_ms", "peak_mb"):
        p, m = line.get(f"predicted_{what}"), line[f"measured_{what}"]
        line[f"{what}_error_pct"] = 100 * (p - m) / m if p and m and not pd.isna(p) else None
    return line


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        base, knobs, network, name = prepare_plan(overrides, "search")
        if not network.measured:  # the search ranks layouts by their predicted step time
            raise PlanError(network.source)
    except Exception as exc:  # PlanError, or what Hydra cannot compose: one line
        print(f"bench.search: invalid config: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    search = base["search"]
    folder = Path(base["results_dir"]) / "search"
    user = [o for o in overrides if not o.lstrip("+~").startswith(OWN_KEYS)]
    runner = Runner(folder, base, user)
    table = plan_lines(base, knobs, network, name)
    picks = top_layouts(table, search["top_k"])
    if not picks:
        console.print("bench.search: no layout is predicted to fit with a predicted step time: nothing to run")
        return 1
    lines, frontiers = [], []
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("top layouts", total=len(picks))
            for pick in picks:
                progress.update(task, description=f"{pick['strategy']} {pick['layout']} on {pick['world_size']}")
                gb = int(pick["micro_batch"] * pick["grad_accum"] * int(pick["layout"].split("x")[0]))
                run = run_overrides(pick, gb, search["steps"], search["warmup"])
                row = runner.run([*run, f"predicted_step_time_ms={pick['predicted_step_ms']:.3f}"])
                lines.append(measured_line(row, prediction(pick, gb), "top"))
                progress.advance(task)
            if search["frontier"]:
                strategies = list(dict.fromkeys(p["strategy"] for p in picks))
                task = progress.add_task("frontier", total=len(strategies))
                for pick in (next(p for p in picks if p["strategy"] == s) for s in strategies):
                    progress.update(task, description=f"frontier of {pick['strategy']} {pick['layout']}")
                    frontiers.append(frontier(base, knobs, pick, runner, lines))
                    progress.advance(task)
    except KeyboardInterrupt:
        console.print(f"bench.search: interrupted; the same command resumes, reusing the finished runs in {folder}")
        return 130
    return report(lines, frontiers, folder, console, runner)


def prediction(line: dict, global_batch: int) -> dict:
    return {"strategy": line["strategy"], "world_size": line["world_size"], "layout": line["layout"],
            "activation_checkpointing": bool(line["activation_checkpointing"]), "global_batch": global_batch,
            "predicted_step_ms": line.get("predicted_step_ms"), "predicted_peak_mb": line.get("predicted_peak_mb"),
            "predicted_per_device": line.get("predicted_tokens_per_s_per_device")}


def frontier(base: dict, knobs: dict, pick: dict, runner: Runner, lines: list[dict]) -> dict:
    limit_mb = pick["device_memory_mb"]
    unit = batch_unit(base, knobs, pick)
    dp = int(pick["layout"].split("x")[0])
    start = predicted_frontier(base, knobs, pick, unit, limit_mb, base["search"]["max_batch"])

    def probe(batch: int) -> bool | None:
        run = run_overrides(pick, batch * dp, 3, 1) + [f"memory_limit_gb={limit_mb / 1024:.6g}"]
        row = runner.run(run)
        predicted = {**pick, "predicted_step_ms": None, "predicted_tokens_per_s_per_device": None,
                     "predicted_peak_mb": predicted_peak_mb(base, knobs, pick, batch)}
        lines.append(measured_line(row, prediction(predicted, batch * dp), "frontier"))
        status = (row or {}).get("status")
        return True if status == "ok" else False if status == "oom" else None

    found = find_frontier(probe, start, unit, base["search"]["max_batch"], base["search"]["max_probes"])
    return {"strategy": pick["strategy"], "world_size": pick["world_size"], "layout": pick["layout"],
            "memory_limit_mb": limit_mb, "predicted_max_batch_per_replica": start,
            "measured_max_batch_per_replica": found["fits"], "first_oom_batch_per_replica": found["oom"],
            "probes": len(found["probes"])}


def report(lines: list[dict], frontiers: list[dict], folder: Path, console: Console, runner: Runner) -> int:
    runs = pd.DataFrame(lines)
    runs.to_csv(folder / "search.csv", index=False)
    pd.DataFrame(frontiers).to_csv(folder / "frontier.csv", index=False)

    def number(value, spec: str) -> str:
        return "-" if value is None or pd.isna(value) else format(value, spec)

    view = Table(title="bench.search: predicted against measured", title_justify="left")
    for column in ("run", "strategy", "ranks", "dp×tp×pp", "ckpt", "batch", "step ms pred", "step ms meas", "err %",
                   "MB pred", "MB meas", "err %", "status"):
        view.add_column(column, justify="left" if column in ("run", "strategy", "status") else "right")
    for r in lines:
        view.add_row(r["kind"], r["strategy"], str(r["world_size"]), r["layout"],
                     "on" if r["activation_checkpointing"] else "off", str(r["global_batch"]),
                     number(r["predicted_step_ms"], ",.1f"), number(r["measured_step_ms"], ",.1f"),
                     number(r["step_ms_error_pct"], "+.0f"), number(r["predicted_peak_mb"], ",.1f"),
                     number(r["measured_peak_mb"], ",.1f"), number(r["peak_mb_error_pct"], "+.0f"), r["status"])
    console.print(view)
    for f in frontiers:
        console.print(f"frontier of {f['strategy']} {f['layout']} on {f['world_size']} rank(s) in "
                      f"{f['memory_limit_mb']:,.0f} MB: predicted {f['predicted_max_batch_per_replica']} per replica, "
                      f"measured {f['measured_max_batch_per_replica']} fits, {f['first_oom_batch_per_replica']} "
                      f"runs out ({f['probes']} runs)")
    ok = [r for r in lines if r["kind"] == "top" and r["status"] == "ok" and r["measured_per_device"]]
    if ok:
        best = max(ok, key=lambda r: r["measured_per_device"])
        console.print(f"best measured: strategy={best['strategy']} on {best['world_size']} rank(s), layout "
                      f"{best['layout']}, activation_checkpointing={best['activation_checkpointing']}: "
                      f"{best['measured_per_device']:,.0f} per second per device ({best['run_dir']})")
    figure = draw_errors(runs, folder / "prediction_error.png")
    console.print(f"{runner.launched} run(s) launched, the rest reused; search.csv, frontier.csv"
                  f"{' and ' + figure.name if figure else ''} in {folder}")
    return 0 if ok else 1


def draw_errors(runs: pd.DataFrame, path: Path) -> Path | None:
    """Predicted against measured step time and memory, one point per run, with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("step_ms", "step time (ms)"), ("peak_mb", "peak memory per rank (MB)")]
    if runs.empty or all(runs[[f"predicted_{k}", f"measured_{k}"]].dropna().empty for k, _ in panels):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (key, label) in zip(axes, panels, strict=True):
        both = runs[[f"predicted_{key}", f"measured_{key}", "strategy"]].dropna()
        for strategy, group in both.groupby("strategy"):
            ax.scatter(group[f"measured_{key}"], group[f"predicted_{key}"], label=strategy)
        if not both.empty:
            low, high = both[[f"predicted_{key}", f"measured_{key}"]].min().min(), \
                both[[f"predicted_{key}", f"measured_{key}"]].max().max()
            ax.plot([low, high], [low, high], "k--", linewidth=1, label="predicted = measured")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("bench.search: prediction against measurement", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
