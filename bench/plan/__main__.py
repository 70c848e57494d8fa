"""`python -m bench.plan [overrides]`: each layout's memory per rank and step time, predicted before anything
runs.

Composes the same config as `python -m bench` (conf/plan.yaml adds the `plan.*` keys), lists the layouts of
every strategy at every `plan.world_sizes` with activation checkpointing on and off (`bench.plan.layouts`),
predicts each one's peak per rank (`bench.plan.memory`) and step time (`bench.plan.steptime`, over the
network `plan.network`), and prints them ranked: those that fit first, then by world size and predicted
throughput per device. The table goes to `<results_dir>/plans/<time>/plan.csv` and `plan.json`, and the
throughput per device against world size, projected, with the measured runs of the same model, to
`projection.png`.
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
from bench.checks import resolve_device
from bench.plan.layouts import DEGREES, candidates
from bench.plan.memory import predicted_memory_mb, rank_memory_mb
from bench.plan.network import Network, NotMeasured, PlanError, load_network
from bench.plan.projection import draw_projection, measured_points
from bench.plan.steptime import StepTimeModel
from bench.rank.runtime import device_name
from bench.rank.topology import default_backend

KINDS = ("params", "grads", "optim", "activations", "temp")
# where the memory could not be simulated (bench.plan.memory.predict_or_none), the step time still is where the
# strategy's collectives are counted rather than traced on the simulated rank (bench.plan.collectives.per_step)
STEP_WITHOUT_MEMORY = ("ddp", "zero", "pipeline")


def compose_plan(overrides: list[str], config_name: str = "plan") -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None, job_name=f"bench.{config_name}"):
        return OmegaConf.to_container(compose(config_name, overrides=overrides), resolve=True)


def per_rank_memory_mb(plan: dict, world: int) -> tuple[float, str]:
    """What one rank may hold: `plan.device_memory_gb`, else this machine's (its GPU's, or its available memory
    shared by `world` ranks)."""
    if plan["device_memory_gb"] is not None:
        return plan["device_memory_gb"] * 1024, "plan.device_memory_gb"
    if plan["device_name"]:
        raise PlanError(f"plan.device_memory_gb: expected the memory of a {plan['device_name']} in GB, got null. "
                        "Set `plan.device_memory_gb=` on the command line.")
    import torch

    return rank_memory_mb("cuda" if torch.cuda.is_available() else "cpu", world)


def plan_lines(base: dict, knobs: dict[str, dict], network: Network, device_name: str) -> pd.DataFrame:
    from bench.measure.mfu import lookup_peak_tflops
    from bench.models import model_spec

    plan = base["plan"]
    lines, device = [], {}
    peak = base["peak_tflops"] if isinstance(base["peak_tflops"], (int, float)) else \
        lookup_peak_tflops(device_name, base["precision"])
    tokens = model_spec(base["model"]).tokens_per_sample(base["model"]) or 1
    model = StepTimeModel(base, network, device_name, peak)
    for cfg, why in candidates(base, knobs, network.gpus_per_node):
        degrees = cfg["parallel"]
        world = cfg["launch"]["nnodes"] * cfg["launch"]["nproc"]
        device_mb, source = device.setdefault(world, per_rank_memory_mb(plan, cfg["launch"]["nproc"]))
        line = {
            "world_size": world,
            "nodes": cfg["launch"]["nnodes"],
            "strategy": cfg["strategy"]["name"],
            "layout": f"{degrees['dp']}x{degrees['tp']}x{degrees['pp']}",
            "activation_checkpointing": cfg["activation_checkpointing"],
            "grad_accum": cfg["grad_accum"],
            "micro_batch": cfg["global_batch"] // max(degrees["dp"], 1) // cfg["grad_accum"],
            "device_memory_mb": device_mb,
            "device_memory_from": source,
        }
        predicted = None if why else predicted_memory_mb(cfg)
        if why:
            line.update(status="refused", note=why)
            lines.append(line)
            continue
        if predicted is None:
            line.update(status="not predicted", note="memory not simulated yet (bench.plan.memory)")
        else:
            fits = predicted["total"] <= device_mb
            line.update({f"{k}_mb": predicted[k] for k in KINDS}, predicted_peak_mb=predicted["total"],
                        headroom_pct=100 * (1 - predicted["total"] / device_mb),
                        status="fits" if fits else "does not fit", note="")
        if predicted is None and cfg["strategy"]["name"] not in STEP_WITHOUT_MEMORY:
            lines.append(line)
            continue
        time, tflops, line["throughput_from"] = model.predict(cfg, predicted) if network.measured else (
            None, None, None)
        if time is not None:
            factor, ms, line["calibration"] = model.overhead(cfg)
            line.update({f"predicted_{k}": v for k, v in time.items()}, rank_tflops=tflops, overhead_factor=factor,
                        overhead_ms=ms)
            line["predicted_step_ms"] = step_ms = time["step_ms"] * factor + ms
            line["predicted_tokens_per_s_per_device"] = cfg["global_batch"] * tokens / step_ms * 1e3 / world
        lines.append(line)
    table = pd.DataFrame.from_records(lines)
    for column in ("predicted_peak_mb", "predicted_step_ms", "predicted_tokens_per_s_per_device"):
        if column not in table:
            table[column] = float("nan")
    order = table["status"].map({"fits": 0, "does not fit": 1, "not predicted": 2, "refused": 3})
    table = table.assign(_order=order, _speed=-table["predicted_tokens_per_s_per_device"].fillna(-1))
    table = table.sort_values(["_order", "world_size", "_speed", "predicted_peak_mb"], kind="stable")
    return table.drop(columns=["_order", "_speed"]).reset_index(drop=True)


def show(table: pd.DataFrame, network: Network, console: Console) -> None:
    caption = f"network: {network.name} ({network.source})" if network.measured else \
        f"step time not predicted: {network.source}"
    view = Table(title="bench.plan: predicted memory per rank (rank 0 at its step's peak) and step time",
                 title_justify="left", caption=caption, caption_justify="left")
    for column in ("ranks", "strategy", "dp×tp×pp", "ckpt", "micro-batch", "memory MB", "per rank MB",
                   "headroom %", "step ms", "comm ms", "bubble ms", "tokens/s/device", "status"):
        view.add_column(column, justify="left" if column in ("strategy", "status") else "right")

    def number(value, spec: str) -> str:
        return "-" if value is None or pd.isna(value) else format(value, spec)

    for r in table.to_dict("records"):
        view.add_row(str(r["world_size"]), r["strategy"], r["layout"], "on" if r["activation_checkpointing"] else
                     "off", str(r["micro_batch"]), number(r.get("predicted_peak_mb"), ",.1f"),
                     f"{r['device_memory_mb']:,.0f}", number(r.get("headroom_pct"), ".0f"),
                     number(r.get("predicted_step_ms"), ",.1f"), number(r.get("predicted_comm_exposed_ms"), ",.1f"),
                     number(r.get("predicted_bubble_ms"), ",.1f"),
                     number(r.get("predicted_tokens_per_s_per_device"), ",.0f"), r["status"])
    console.print(view)
    sources = table["throughput_from"].dropna().unique() if "throughput_from" in table else []
    for source in sources:
        console.print(f"throughput: {source}")


def prepare_plan(overrides: list[str], config_name: str = "plan") -> tuple[dict, dict, Network, str]:
    """The composed config, each strategy's own keys, the network and the device planned for; PlanError (or
    Hydra's own) for what cannot be planned."""
    base = compose_plan(overrides, config_name)
    unknown = sorted(set(base["plan"]["strategies"]) - set(DEGREES))
    if unknown:
        raise PlanError(f"plan.strategies: expected some of {', '.join(DEGREES)}, got {unknown}. "
                        "Change `plan.strategies=` on the command line.")
    own = [o for o in overrides if not o.lstrip("+~").startswith("strategy")]
    knobs = {name: compose_plan([*own, f"strategy={name}"], config_name)["strategy"]
             for name in base["plan"]["strategies"]}
    base["device"] = resolve_device(base["device"])
    base["backend"] = default_backend(base["device"]) if base["backend"] == "auto" else base["backend"]
    name = base["plan"]["device_name"] or device_name(base["device"])
    try:
        network = load_network(base["plan"], base["results_dir"], name, base["backend"])
    except NotMeasured as exc:  # memory is planned all the same; the table says why step time is not
        worlds = base["plan"]["world_sizes"] or [base["launch"]["nproc"]]
        network = Network("not measured", str(exc), base["plan"]["gpus_per_node"] or max(worlds), intra={},
                          measured=False)  # every rank on this machine, unless told how many a node holds
    per_rank_memory_mb(base["plan"], 1)
    return base, knobs, network, name


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        base, knobs, network, name = prepare_plan(overrides)
    except Exception as exc:  # PlanError, or a key or value Hydra cannot compose: one line, as python -m bench says it
        print(f"bench.plan: invalid config: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    table = plan_lines(base, knobs, network, name)
    show(table, network, console)
    out = Path(base["results_dir"]) / "plans" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "plan.csv", index=False)
    (out / "plan.json").write_text(json.dumps(json.loads(table.to_json(orient="records")), indent=1))
    figure = draw_projection(table, measured_points(base, name), base, network, out / "projection.png")
    console.print(f"plan written to {out}/plan.csv and plan.json" + (f"; projection: {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
