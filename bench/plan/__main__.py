"""`python -m bench.plan [overrides]`: each layout's memory per rank and step time, predicted before anything
runs.

Composes the same config as `python -m bench` (conf/plan.yaml adds the `plan.*` keys), lists the layouts of
every strategy at every `plan.world_sizes` with activation checkpointing on and off, predicts each one's peak
per rank and step time (over the network `plan.network`), and prints them ranked (`bench.plan.table`): those
that fit first, then by world size and predicted throughput per device. The table goes to
`<results_dir>/plans/<time>/plan.csv` and `plan.json`, and the throughput per device against world size,
projected, with the measured runs of the same model, to `projection.png`.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from bench.plan.network import Network
from bench.plan.projection import draw_projection, measured_points
from bench.plan.setup import prepare_plan
from bench.plan.table import make_plan, plan_table

USAGE = """usage: python -m bench.plan [KEY=VALUE ...]

Each layout's memory per rank and step time, predicted before anything runs. Every key of `python -m bench`
applies (model, global_batch, precision, ...), and the planner's own:
  plan.world_sizes=[1,2,4,8]        ranks to plan for (null: launch.nproc)
  plan.strategies=[ddp,fsdp]        strategies to compare (null: every one that plans its layouts)
  plan.cp=[1,2,4]                   context-parallel degrees (long sequences), where the sequence divides
  plan.ep=[1,2,8]                   expert-parallel degrees (mixtures of experts), where the experts divide
  plan.device_memory_gb=80          memory per rank (null: the network preset's GPU, else this machine's)
  plan.shown_per_strategy=3         layouts printed per strategy and world size (all of them in plan.csv)
  plan.workers=4                    processes simulating ahead (null: this machine's cores, at most 8)
  plan.network=measured             python -m bench.comm results in results_dir, or a preset of plan.networks
  plan.device_tflops=400            a rank's achieved TFLOP/s (null: measured strategy=single runs)
`python -m bench.plan --cfg job` prints every key. Writes <results_dir>/plans/<time>/plan.csv, plan.json and
projection.png."""


def wants_help(argv: list[str], usage: str) -> bool:
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage)
        return True
    return False


def print_config(argv: list[str], config_name: str) -> bool:
    """`--cfg job`: the composed config, as `python -m bench --cfg job` prints it."""
    if "--cfg" not in argv:
        return False
    import yaml

    from bench.plan.setup import compose

    print(yaml.safe_dump(compose([a for a in argv if a not in ("--cfg", "job")], config_name), sort_keys=False))
    return True


def shown(table: pd.DataFrame, per_strategy: int | None) -> pd.DataFrame:
    """The lines printed: each world size's first `per_strategy` of each strategy, in the plan's order (at 1,024
    ranks a plan holds hundreds of layouts; the CSV holds them all)."""
    if not per_strategy:
        return table
    return table[table.groupby(["world_size", "strategy"]).cumcount() < per_strategy]


def show(table: pd.DataFrame, network: Network, console: Console, per_strategy: int | None = None) -> None:
    caption = f"network: {network.name} ({network.source})" if network.measured else \
        f"step time not predicted: {network.source}"
    lines = shown(table, per_strategy)
    if len(lines) < len(table):
        caption += f"\n{len(table) - len(lines)} more layouts in plan.csv (plan.shown_per_strategy={per_strategy})"
    view = Table(title="bench.plan: predicted memory per rank (rank 0 at its step's peak) and step time",
                 title_justify="left", caption=caption, caption_justify="left")
    for column in ("ranks", "strategy", "dp×tp×pp", "ckpt", "micro-batch", "memory MB", "per rank MB",
                   "headroom %", "step ms", "comm ms", "bubble ms", "tokens/s/device", "status"):
        view.add_column(column, justify="left" if column in ("strategy", "status") else "right")

    def number(value, spec: str) -> str:
        return "-" if value is None or pd.isna(value) else format(value, spec)

    for r in lines.to_dict("records"):
        view.add_row(str(r["world_size"]), r["strategy"], r["layout"], "on" if r["activation_checkpointing"] else
                     "off", number(r["micro_batch"], ".0f"), number(r.get("predicted_peak_mb"), ",.1f"),
                     f"{r['device_memory_mb']:,.0f}", number(r.get("headroom_pct"), ".0f"),
                     number(r.get("predicted_step_ms"), ",.1f"), number(r.get("predicted_comm_exposed_ms"), ",.1f"),
                     number(r.get("predicted_bubble_ms"), ",.1f"),
                     number(r.get("predicted_tokens_per_s_per_device"), ",.0f"), r["status"])
    console.print(view)
    for source in table["throughput_from"].dropna().unique():
        console.print(f"throughput: {source}")


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    if wants_help(overrides, USAGE) or print_config(overrides, "plan"):
        return 0
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        planning = prepare_plan(overrides)
    except Exception as exc:  # PlanError, or a key or value Hydra cannot compose: one line, as python -m bench says it
        print(f"bench.plan: invalid config: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    table = plan_table(make_plan(planning))
    show(table, planning.network, console, planning.plan["shown_per_strategy"])
    out = Path(planning.base["results_dir"]) / "plans" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "plan.csv", index=False)
    (out / "plan.json").write_text(json.dumps(json.loads(table.to_json(orient="records")), indent=1))
    points = measured_points(planning.base, planning.device_name)
    figure = draw_projection(table, points, planning, out / "projection.png")
    console.print(f"plan written to {out}/plan.csv and plan.json" + (f"; projection: {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
