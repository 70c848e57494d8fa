"""`python -m bench.plan [overrides]`: each layout's memory per rank, predicted before anything runs.

Composes the same config as `python -m bench` (conf/plan.yaml adds the `plan.*` keys), lists the layouts of
every strategy at every `plan.world_sizes` with activation checkpointing on and off (`bench.plan.layouts`),
predicts each one's peak per rank (`bench.plan.memory`), and prints them ranked: those that fit first, then
by world size and predicted peak. Step time is not predicted yet. The table goes to
`<results_dir>/plans/<time>/plan.csv` and `plan.json`.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from bench import conf_dir
from bench.plan.layouts import DEGREES, candidates
from bench.plan.memory import predicted_memory_mb, rank_memory_mb

KINDS = ("params", "grads", "optim", "activations", "temp")


def compose_plan(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None, job_name="bench.plan"):
        return OmegaConf.to_container(compose("plan", overrides=overrides), resolve=True)


def per_rank_memory_mb(plan: dict, world: int) -> tuple[float, str]:
    """What one rank may hold: `plan.device_memory_gb`, else this machine's (its GPU's, or its available memory
    shared by `world` ranks)."""
    if plan["device_memory_gb"] is not None:
        return plan["device_memory_gb"] * 1024, "plan.device_memory_gb"
    import torch

    return rank_memory_mb("cuda" if torch.cuda.is_available() else "cpu", world)


def plan_lines(base: dict, knobs: dict[str, dict]) -> pd.DataFrame:
    lines, device = [], {}
    for cfg, why in candidates(base, knobs):
        degrees = cfg["parallel"]
        world = cfg["launch"]["nproc"]
        device_mb, source = device.setdefault(world, per_rank_memory_mb(base["plan"], world))
        line = {
            "world_size": world,
            "strategy": cfg["strategy"]["name"],
            "layout": f"{degrees['dp']}x{degrees['tp']}x{degrees['pp']}",
            "activation_checkpointing": cfg["activation_checkpointing"],
            "grad_accum": cfg["grad_accum"],
            "micro_batch": cfg["global_batch"] // max(degrees["dp"], 1) // cfg["grad_accum"],
            "device_memory_mb": device_mb,
            "device_memory_from": source,
        }
        predicted = None if why else predicted_memory_mb(cfg)
        if predicted is None:
            line.update(status="refused" if why else "not predicted",
                        note=why or "not simulated yet (bench.plan.memory)")
        else:
            fits = predicted["total"] <= device_mb
            line.update({f"{k}_mb": predicted[k] for k in KINDS}, predicted_peak_mb=predicted["total"],
                        headroom_pct=100 * (1 - predicted["total"] / device_mb),
                        status="fits" if fits else "does not fit", note="")
        lines.append(line)
    table = pd.DataFrame.from_records(lines)
    if "predicted_peak_mb" not in table:
        table["predicted_peak_mb"] = float("nan")
    order = table["status"].map({"fits": 0, "does not fit": 1, "not predicted": 2, "refused": 3})
    table = table.assign(_order=order).sort_values(["_order", "world_size", "predicted_peak_mb"], kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def show(table: pd.DataFrame, console: Console) -> None:
    view = Table(title="bench.plan: predicted memory per rank (rank 0 at its step's peak)", title_justify="left")
    for column in ("ranks", "strategy", "dp×tp×pp", "ckpt", "micro-batch", "predicted MB", "per rank MB",
                   "headroom %", "status"):
        view.add_column(column, justify="left" if column in ("strategy", "status") else "right")
    for r in table.itertuples():
        peak = getattr(r, "predicted_peak_mb", float("nan"))
        headroom = getattr(r, "headroom_pct", float("nan"))
        view.add_row(str(r.world_size), r.strategy, r.layout, "on" if r.activation_checkpointing else "off",
                     str(r.micro_batch), "-" if pd.isna(peak) else f"{peak:,.1f}", f"{r.device_memory_mb:,.0f}",
                     "-" if pd.isna(headroom) else f"{headroom:.0f}", r.status)
    console.print(view)


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    console = Console()
    try:
        base = compose_plan(overrides)
        unknown = sorted(set(base["plan"]["strategies"]) - set(DEGREES))
        if unknown:
            raise ValueError(f"plan.strategies: expected some of {', '.join(DEGREES)}, got {unknown}. "
                             "Change `plan.strategies=` on the command line.")
        own = [o for o in overrides if not o.lstrip("+~").startswith("strategy")]
        knobs = {name: compose_plan([*own, f"strategy={name}"])["strategy"] for name in base["plan"]["strategies"]}
    except Exception as exc:  # a key or value Hydra cannot compose: one line, as python -m bench says it
        print(f"bench.plan: invalid config: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    table = plan_lines(base, knobs)
    show(table, console)
    out = Path(base["results_dir"]) / "plans" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "plan.csv", index=False)
    (out / "plan.json").write_text(json.dumps(json.loads(table.to_json(orient="records")), indent=1))
    console.print(f"plan written to {out}/plan.csv and plan.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
