"""bench.plan against a published table: the Megatron-LM paper's Table 1 (Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", SC'21): GPT models from 1.7B to 1T
parameters on 32 to 3,072 A100s, each with its tensor x pipeline x data-parallel layout and its measured
teraFLOP/s per GPU.

    python launch/megatron-table1.py [--rows 1,2,3] [--ranked 1,2] [--out results/examples/plan]

Each row's model is `model=gpt` at the paper's sizes (sequence 2,048, vocabulary 51,200), planned on
`plan.network=a100-nvlink-ib200` in bf16 (the paper's fp16 peaks the same on an A100: 312 TFLOP/s; bench's pipeline
takes no fp16) with activation checkpointing (every row of the paper recomputes), each row's micro-batch size and
pipeline schedule from NVIDIA's own script for the table (examples/academic_paper_scripts/sc21/run_table_1.sh).
Compute is calibrated once: plan.device_tflops such that the smallest row predicts its published 137 teraFLOP/s.
For every row: bench's predicted teraFLOP/s per GPU for Megatron's own layout by the paper's count (its
equation 3, recomputation included), against the published figure; for the rows in --ranked, the whole plan of
the world size (every pipeline layout, tensor x pipeline x data, all-reduced or FSDP-sharded, and DDP) and the
rank of Megatron's layout among those that fit, and among those Megatron offered (gradients all-reduced: no FSDP
or HSDP). Writes megatron-table1.csv and .md under --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from bench.parallel.topology import Degrees
from bench.plan.calibration import StepTimeModel
from bench.plan.layouts import Layout, layout_config
from bench.plan.memory import predicted_memory_mb
from bench.plan.setup import prepare_plan
from bench.plan.table import make_plan, plan_table
from bench.run import Run

SEQ, VOCAB = 2048, 51200
# params (B), heads, hidden, layers, tp, pp, GPUs, batch, teraFLOP/s per GPU: the paper's Table 1; micro-batch size
# and interleaved stages per rank (1: 1F1B) from run_table_1.sh (NVIDIA/Megatron-LM)
TABLE = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 16, 1),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 16, 1),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 16, 1),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 8, 1),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 4, 1),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 2, 3),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 2, 2),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 1, 2),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 1, 3),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 1, 1),
]
COLUMNS = ("params_b", "heads", "hidden", "layers", "tp", "pp", "gpus", "batch", "published_tflops", "micro_batch",
           "stages_per_rank")


def megatron_flops(batch: int, layers: int, hidden: int) -> float:
    """The paper's equation 3: 96 B s l h^2 (1 + s / 6h + V / 16lh), recomputation's extra forward included."""
    return 96 * batch * SEQ * layers * hidden**2 * (1 + SEQ / (6 * hidden) + VOCAB / (16 * layers * hidden))


def overrides(row: dict, tflops: float, results_dir: str) -> list[str]:
    schedule = "interleaved" if row["stages_per_rank"] > 1 else "1f1b"
    return ["model=gpt", f"model.n_layers={row['layers']}", f"model.d_model={row['hidden']}",
            f"model.n_heads={row['heads']}", f"model.vocab_size={VOCAB}", f"model.seq_len={SEQ}",
            f"global_batch={row['batch']}", "precision=bf16", f"plan.world_sizes=[{row['gpus']}]",
            "plan.strategies=[pipeline,ddp]", "plan.activation_checkpointing=[true]",
            "plan.network=a100-nvlink-ib200", f"plan.device_tflops={tflops}", "plan.calibrate=false",
            "strategy=pipeline", f"strategy.microbatch_size={row['micro_batch']}", f"strategy.schedule={schedule}",
            f"strategy.stages_per_rank={row['stages_per_rank']}", f"results_dir={results_dir}"]


def megatron_layout(row: dict) -> Layout:
    """Megatron's own: tp x pp x dp with its gradients all-reduced; no pipeline at all is DDP (tp = 1) or a
    pipeline of one stage (tensor x data parallel)."""
    dp = row["gpus"] // (row["tp"] * row["pp"])
    nodes = max(1, row["gpus"] // 8)
    if row["tp"] == 1 and row["pp"] == 1:
        return Layout("ddp", Degrees(dp=dp), nodes, True)
    return Layout("pipeline", Degrees(dp=dp, tp=row["tp"], pp=row["pp"]), nodes, True,
                  knobs=(("fsdp", False),) if dp > 1 else ())


def predict_layout(row: dict, tflops: float, results_dir: str) -> dict:
    """Megatron's layout alone: its memory and step time, as the plan predicts them."""
    planning = prepare_plan(overrides(row, tflops, results_dir))
    layout = megatron_layout(row)
    run = Run.of(layout_config(planning.base, planning.knobs[layout.strategy], layout))
    memory, why = predicted_memory_mb(run)
    model = StepTimeModel(planning.base, planning.plan, planning.network, planning.device_name, None)
    step, _, _ = model.predict(run, memory)
    return {"layout": f"{layout.strategy} {layout.label}", "memory_mb": memory and memory["total"], "why": why,
            **{k: step[k] for k in ("step_ms", "compute_ms", "comm_exposed_ms", "bubble_ms")}}


def rank_in_plan(row: dict, tflops: float, results_dir: str, out: Path) -> dict:
    """The whole plan at the row's world size: Megatron's layout's place among the layouts that fit, fastest
    first, and the fastest; the plan's table to megatron-table1-row<N>.csv."""
    planned = make_plan(prepare_plan(overrides(row, tflops, results_dir)))
    plan_table(planned).to_csv(out / f"megatron-table1-row{row['row']}.csv", index=False)
    fits = [p for p in planned if p.status == "fits" and p.predicted_step_ms]
    target = megatron_layout(row)
    key = (target.strategy, target.degrees, target.knobs)
    names = [(p.layout.strategy, p.layout.degrees, p.layout.knobs) for p in fits]
    # what Megatron offered in 2021: tp x pp x dp with the gradients all-reduced (no FSDP, no HSDP)
    own = [n for n, p in zip(names, fits, strict=True)
           if p.layout.strategy == "ddp" or ("fsdp", False) in p.layout.knobs]
    return {"rank": names.index(key) + 1 if key in names else None, "fitting": len(fits), "planned": len(planned),
            "fastest": f"{fits[0].layout.strategy} {fits[0].layout.label}" if fits else None,
            "rank_all_reduced": own.index(key) + 1 if key in own else None, "all_reduced": len(own)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(str(i + 1) for i in range(len(TABLE))))
    parser.add_argument("--ranked", default="1,2")
    parser.add_argument("--out", default="results/examples/plan")
    parser.add_argument("--results-dir", default="results/megatron-table1")
    args = parser.parse_args()
    rows = [dict(zip(COLUMNS, TABLE[int(i) - 1], strict=True)) | {"row": int(i)} for i in args.rows.split(",")]
    ranked = {int(i) for i in args.ranked.split(",") if i}

    # compute calibrated once, on the smallest row: its step at a guess, then the throughput that gives 137
    first = dict(zip(COLUMNS, TABLE[0], strict=True))
    guess = 150.0
    step = predict_layout(first, guess, args.results_dir)
    target_ms = megatron_flops(first["batch"], first["layers"], first["hidden"]) / (
        first["published_tflops"] * 1e12 * first["gpus"]) * 1e3
    tflops = guess * step["compute_ms"] / (target_ms - (step["step_ms"] - step["compute_ms"]))
    print(f"calibrated: plan.device_tflops={tflops:.1f} (row 1's 137 teraFLOP/s per GPU)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for row in rows:
        began = time.perf_counter()
        got = predict_layout(row, round(tflops, 2), args.results_dir)
        predicted = megatron_flops(row["batch"], row["layers"], row["hidden"]) / (
            got["step_ms"] / 1e3 * row["gpus"]) / 1e12
        line = {**row, **got, "predicted_tflops": predicted,
                "error_pct": 100 * (predicted / row["published_tflops"] - 1)}
        if row["row"] in ranked:
            line.update(rank_in_plan(row, round(tflops, 2), args.results_dir, out))
        line["seconds"] = time.perf_counter() - began
        lines.append(line)
        print({k: line[k] for k in ("row", "params_b", "layout", "published_tflops", "predicted_tflops", "error_pct",
                                    "seconds")} | {k: line.get(k) for k in ("rank", "fitting", "fastest")},
              flush=True)
    table = pd.DataFrame(lines)
    table.to_csv(out / "megatron-table1.csv", index=False)
    (out / "megatron-table1.md").write_text(markdown(table, tflops))
    print(markdown(table, tflops))


def markdown(table: pd.DataFrame, tflops: float) -> str:
    head = ("| params | GPUs | tp x pp x dp | batch | micro | published TFLOP/s | bench TFLOP/s | error | step s | "
            "exposed comm s | bubble s | memory GB | Megatron's layout ranked: of all that fit; of those Megatron "
            "offered (gradients all-reduced) |\n" + "|---" * 13 + "|\n")
    body = ""
    for r in table.to_dict("records"):
        rank = (f"{int(r['rank'])} of {int(r['fitting'])} (fastest: {r['fastest']}); {int(r['rank_all_reduced'])} of "
                f"{int(r['all_reduced'])} all-reduced" if pd.notna(r.get("rank", None)) else "-")
        dp = r["gpus"] // (r["tp"] * r["pp"])
        body += (f"| {r['params_b']}B | {r['gpus']} | {r['tp']}x{r['pp']}x{dp} | {r['batch']} | {r['micro_batch']} | "
                 f"{r['published_tflops']} | {r['predicted_tflops']:.0f} | {r['error_pct']:+.0f}% | "
                 f"{r['step_ms'] / 1e3:.1f} | {r['comm_exposed_ms'] / 1e3:.2f} | {r['bubble_ms'] / 1e3:.2f} | "
                 f"{r['memory_mb'] / 1024:.1f}{'' if r['memory_mb'] <= 80 * 1024 else ' (> 80)'} | {rank} |\n")
    mean = table["error_pct"].abs().mean()
    return head + body + f"\nmean |error| {mean:.1f}%; compute calibrated on row 1: {tflops:.1f} TFLOP/s a GPU\n"


if __name__ == "__main__":
    main()
