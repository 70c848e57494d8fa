"""bench beside torchtitan on the same GPU: the same Llama 3 model, sequence, batch, precision and FSDP, both timed.

    python benchmarks/vs_torchtitan.py --out results/vs_torchtitan                 # one GPU: compile off, then on
    python benchmarks/vs_torchtitan.py --tiny --device cpu --out /tmp/vs_titan     # CPU smoke run (gloo), tiny sizes

Both sides train Llama 3 8B's width (dim 4096, 32 heads, 8 KV heads, FFN 14336, vocab 128256, untied head) cut to
--layers layers, on --seq-len tokens per sample, --batch samples per step, bf16 compute through FSDP2's
MixedPrecisionPolicy (parameters gathered in bf16, gradients reduced in fp32, fp32 master weights), FSDP on one
device, no activation checkpointing, AdamW (lr 3e-4, weight decay 0.1, torch's default implementation), random
tokens kept on the device, the loss a cross-entropy over the full logits:

- bench: `python -m bench model=llama3-8b strategy=fsdp precision=bf16 ...` (the Hugging Face Llama, SDPA
  attention), its rows read back from <out>/bench/runs.jsonl.
- torchtitan 0.3.0: its own Llama 3 model (`Llama3Model`, built from the 8B flavour's layer configs) and its own
  `parallelize_llama` (per-block torch.compile, then FSDP2 with its mixed-precision policy), driven by the
  plain loop in `titan_worker` below under `torchrun --nproc-per-node 1`. torchtitan's trainer
  (`python -m torchtitan.train`) is not used: it imports datasets (pyarrow alone is a 52 MiB wheel), tensorboard
  and torch_checkpointing, and reads a tokenizer and the c4_test set from ./tests/assets, which the wheel does not
  ship. The worker does what the trainer does around the model: meta-device build, RoPE cache cut to the sequence,
  sharding config, parallelize, to_empty + init_weights, spmd_types input annotation and context, torchtitan's
  CrossEntropyLoss (sum / tokens). It leaves out what the trainer adds around the step (gradient clipping,
  fused AdamW, CUDA-graph capture of forward+backward, LR schedule, GC control), as bench has none of them.

torchtitan's attention: --tt-attn sdpa (default) keeps its GQAttention but uses its ScaledDotProductAttention
inner op (causal F.scaled_dot_product_attention, the op bench's Hugging Face model calls; torchtitan asks for
cuDNN first, then flash); --tt-attn flex is torchtitan's own default for language models (FlexAttention with a
block-causal mask built each step, compiled with max-autotune: minutes of autotuning on a first run). One
document per sample, so both masks are plain causal. Compile on: each block, inductor (--tiny: aot_eager).

Each run is a separate process; the order alternates (compile off: bench first; compile on: torchtitan first).
tokens/s = batch x seq-len x measured steps / their summed step times (CUDA events around each step, the
--warmup first steps excluded), as bench's own tokens_per_s. MFU uses one formula for both sides:
FLOPs per token = 6N + 12·L·d·T, N the matmul weights a token passes through (per layer q, k, v, o and the three
FFN matrices, plus the LM head; embeddings and norms excluded), L layers, d = heads x head dim, T the sequence
(causal masking not discounted) -- bench's FLOPS_CONVENTION and torchtitan's get_dense_model_nparams_and_flops
(which also counts the norms' few weights); MFU % = 100 x tokens/s x FLOPs per token / peak, the peak from
bench's table (H200 bf16 dense: 989.4 TFLOP/s). Peak memory: torch.cuda.max_memory_allocated over the steps
(reset after setup), as bench's cuda_peak_allocated_mb; on a CPU the processes' peak RSS instead.
Written to <out>/vs_torchtitan.json and <out>/vs_torchtitan.md after every run (a cut-off run keeps what it had).

On the GPU machine (no network; torch, transformers, hydra already there): torchtitan's model path needs only
six small pure-Python wheels, 1.7 MiB together (torchtitan's other requirements are for its trainer):

    pip download --no-deps --only-binary=:all: --python-version 3.12 -d wheels torchtitan==0.3.0 \
        spmd_types==0.2.3 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 typing_extensions==4.16.0
    pip install --no-deps --no-index wheels/*.whl        # on the GPU machine, then:
    python benchmarks/vs_torchtitan.py --out results/vs_torchtitan

(typeguard needs typing_extensions >= 4.14; triton, which torchtitan imports whatever the model, comes with CUDA
torch; a CPU torch has none: `pip install --target DIR triton` and DIR on PYTHONPATH for the --tiny run.)
torchtitan 0.3.0 is released against torch 2.14. On an older torch the worker fills in what 0.3.0 reaches for
and that torch lacks, only where it lacks it, and the results name each (`compat`): on torch 2.11,
`torch.distributed.fsdp.DataParallelMeshDims` (imported at the top of torchtitan.distributed.fsdp, used only with
more than one data-parallel rank) and, for --tt-attn flex only, create_block_mask's `separate_full_blocks`
argument (torch 2.11 always separates full blocks, which is what torchtitan asks for).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench from this checkout, installed or not
LR, WEIGHT_DECAY = 3e-4, 0.1
LLAMA3_8B = {"dim": 4096, "heads": 32, "kv_heads": 8, "ffn": 14336, "vocab": 128256}
TINY = {"dim": 256, "heads": 4, "kv_heads": 1, "ffn": 768, "vocab": 1024, "layers": 2, "seq_len": 256}
SIDES = ("bench", "torchtitan")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1, help="samples per step (one device: local = global batch)")
    p.add_argument("--steps", type=int, default=30, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of every figure")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument("--out", default="results/vs_torchtitan")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="dim 256, 2 layers, seq 256, vocab 1024: the plumbing on a CPU")
    p.add_argument("--tt-attn", choices=["sdpa", "flex"], default="sdpa", help="torchtitan's inner attention op")
    # the torchtitan side, as torchrun starts it: python -m torch.distributed.run ... vs_torchtitan.py --worker ...
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-compile", choices=["off", "on"], help=argparse.SUPPRESS)
    p.add_argument("--worker-result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error("--warmup must be below --steps (the measured steps come after it)")
    return args


def model_sizes(args) -> dict:
    if args.tiny:
        return dict(TINY)
    return {**LLAMA3_8B, "layers": args.layers, "seq_len": args.seq_len}


def compile_backend(args) -> str:
    """inductor; aot_eager for --tiny, whose compile-on runs check the plumbing (aot_eager compiles in ~1 s)."""
    return "aot_eager" if args.tiny else "inductor"


def matmul_weights(s: dict) -> int:
    """N: the weights of the matmuls a token passes through (per layer q, k, v, o, w1, w2, w3; the LM head)."""
    head_dim = s["dim"] // s["heads"]
    per_layer = 2 * s["dim"] * s["dim"] + 2 * s["dim"] * s["kv_heads"] * head_dim + 3 * s["dim"] * s["ffn"]
    return s["layers"] * per_layer + s["vocab"] * s["dim"]


def flops_per_token(s: dict) -> float:
    """6N + 12·L·d·T (d = heads x head dim = dim here; the full T x T square, causal masking not discounted)."""
    return 6.0 * matmul_weights(s) + 12.0 * s["layers"] * s["dim"] * s["seq_len"]


# ------------------------------------------------------------------------------------------------ the controller


def bench_command(args, s: dict, compile_on: bool, results_dir: Path) -> list[str]:
    overrides = {
        "model": "llama3-8b",
        "strategy": "fsdp",
        "precision": "bf16",
        "optim.name": "adamw",
        "optim.lr": LR,
        "optim.weight_decay": WEIGHT_DECAY,
        "global_batch": args.batch,
        "compile": str(compile_on).lower(),
        "compile_backend": compile_backend(args),
        "activation_checkpointing": "false",
        "device": args.device,
        "steps": args.steps,
        "warmup": args.warmup,
        "model.seq_len": s["seq_len"],
        "model.config.num_hidden_layers": s["layers"],
        "model.config.hidden_size": s["dim"],
        "model.config.num_attention_heads": s["heads"],
        "model.config.num_key_value_heads": s["kv_heads"],
        "model.config.intermediate_size": s["ffn"],
        "model.config.vocab_size": s["vocab"],
        "model.config.max_position_embeddings": max(8192, s["seq_len"]),
        "results_dir": str(results_dir),
        "progress": "false",
    }
    return [sys.executable, "-m", "bench", *(f"{k}={v}" for k, v in overrides.items())]


def titan_command(args, compile_on: bool, result: Path) -> list[str]:
    own = [f"--layers={args.layers}", f"--seq-len={args.seq_len}", f"--batch={args.batch}", f"--steps={args.steps}",
           f"--warmup={args.warmup}", f"--device={args.device}", f"--tt-attn={args.tt_attn}"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
            str(Path(__file__).resolve()), *own, *(["--tiny"] if args.tiny else []), "--worker",
            f"--worker-compile={'on' if compile_on else 'off'}", f"--worker-result={result}"]


def run_logged(cmd: list[str], log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - start


def failure(log: Path) -> str:
    """The last exception line of a run's log (torchrun's own ChildFailedError report comes after it)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\w(Error|Exception)\b:", line) and "ChildFailedError" not in line]
    return errors[-1] if errors else " | ".join(lines[-6:])


def run_bench(args, s: dict, compile_on: bool, out: Path) -> dict:
    # one results_dir for both: the controller's memory prediction and FLOP count (minutes for billions of
    # parameters) are cached there per configuration, and compile changes neither
    results_dir = out / "bench"
    log = out / "logs" / f"bench-compile-{'on' if compile_on else 'off'}.log"
    rows_file = results_dir / "runs.jsonl"
    rows_before = len(rows_file.read_text().splitlines()) if rows_file.exists() else 0  # a rerun appends
    rc, wall_s = run_logged(bench_command(args, s, compile_on, results_dir), log)
    rows = rows_file.read_text().splitlines() if rows_file.exists() else []
    row = json.loads(rows[-1]) if len(rows) > rows_before else {}
    if rc != 0 or row.get("status") != "ok":
        return {"status": "failed", "error": row.get("error") or failure(log), "log": str(log), "wall_s": wall_s}
    on_cuda = row.get("cuda_peak_allocated_mb") is not None
    return {
        "status": "ok",
        "tokens_per_s": row["tokens_per_s"],
        "step_time_ms": row["step_time_ms_mean"],
        "peak_mem_mb": row["cuda_peak_allocated_mb"] if on_cuda else row["peak_rss_mb"],
        "peak_mem_kind": "cuda_max_allocated" if on_cuda else "peak_rss",
        "params": row["params"],
        "loss_first": row["loss_first"],
        "loss_last": row["loss_last"],
        "device_name": row["device_name"],
        "torch_version": row["torch_version"],
        "own_mfu_pct": row.get("mfu_pct"),  # bench's own figure, same convention: a cross-check of ours
        "own_flops_per_token": (row["model_flops_per_step"] / (args.batch * s["seq_len"])
                                if row.get("model_flops_per_step") else None),
        "log": str(log),
        "wall_s": wall_s,
    }


def run_titan(args, s: dict, compile_on: bool, out: Path) -> dict:
    result = out / f"torchtitan-compile-{'on' if compile_on else 'off'}.json"
    log = out / "logs" / f"torchtitan-compile-{'on' if compile_on else 'off'}.log"
    result.unlink(missing_ok=True)
    rc, wall_s = run_logged(titan_command(args, compile_on, result), log)
    if rc != 0 or not result.exists():
        return {"status": "failed", "error": failure(log), "log": str(log), "wall_s": wall_s}
    return {**json.loads(result.read_text()), "log": str(log), "wall_s": wall_s}


def with_mfu(run: dict, fpt: float) -> dict:
    from bench.measure.mfu import lookup_peak_tflops

    if run["status"] != "ok":
        return run
    peak = lookup_peak_tflops(run["device_name"], "bf16")
    mfu = None if peak is None else 100.0 * run["tokens_per_s"] * fpt / (peak * 1e12)
    return {**run, "peak_tflops": peak, "mfu_pct": mfu, "peak_mem_gb": run["peak_mem_mb"] / 1024}


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    s, runs = report["sizes"], report["runs"]
    mem_kind = next((r["peak_mem_kind"] for r in runs if r["status"] == "ok"), "cuda_max_allocated")
    mem_label = "peak mem GiB (CUDA max allocated)" if mem_kind == "cuda_max_allocated" else "peak mem GiB (CPU: RSS)"
    lines = [
        f"# bench beside torchtitan {report['torchtitan_version']}",
        "",
        f"Llama 3 (dim {s['dim']}, {s['heads']} heads, {s['kv_heads']} KV heads, FFN {s['ffn']}, vocab {s['vocab']}), "
        f"{s['layers']} layers, sequence {s['seq_len']}, batch {report['batch']}; bf16 through FSDP2 "
        f"(param bf16, reduce fp32), FSDP on one {report['device']} device, no activation checkpointing, AdamW; "
        f"{report['steps']} steps, the first {report['warmup']} left out; compile: each block, "
        f"{report['compile_backend']}. torchtitan attention: {report['tt_attn']}.",
        "",
        f"FLOPs per token = 6N + 12·L·d·T = 6 x {report['matmul_weights']:,} + 12 x {s['layers']} x {s['dim']} x "
        f"{s['seq_len']} = {report['flops_per_token']:.4g} (N: layers' q, k, v, o, w1, w2, w3 and the LM head; "
        "embeddings and norms left out). MFU % = 100 x tokens/s x FLOPs per token / peak bf16 dense "
        f"({fmt(report.get('peak_tflops'), '.1f')} TFLOP/s).",
        "",
        f"| side | compile | tokens/s | MFU % | {mem_label} | step ms | loss first → last |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for compile_ in report["compiles"]:
        pair = {r["side"]: r for r in runs if r["compile"] == compile_}
        for side in SIDES:
            r = pair.get(side)
            if r is None:
                continue
            if r["status"] != "ok":
                lines.append(f"| {side} | {compile_} | failed | | | | {r['error'][-160:].replace('|', '/')} |")
                continue
            lines.append(f"| {side} | {compile_} | {r['tokens_per_s']:,.0f} | {fmt(r['mfu_pct'], '.1f')} | "
                         f"{r['peak_mem_gb']:.2f} | {r['step_time_ms']:.1f} | "
                         f"{r['loss_first']:.3f} → {r['loss_last']:.3f} |")
        ratios = next((q for q in report["ratios"] if q["compile"] == compile_), None)
        if ratios:
            lines.append(f"| **bench / torchtitan** | {compile_} | **{fmt(ratios['tokens_per_s'], '.3f')}** | "
                         f"{fmt(ratios['mfu'], '.3f')} | {fmt(ratios['peak_mem'], '.3f')} | "
                         f"{fmt(ratios['step_time'], '.3f')} | |")
    lines += ["", "Throughput ratio bench / torchtitan: goal >= 1.0 (memory ratio: below 1.0 is bench holding less)."]
    for r in runs:
        if r["status"] == "ok":
            extra = f", its own mfu_pct {fmt(r.get('own_mfu_pct'), '.1f')}" if r["side"] == "bench" else ""
            compat = f", compat: {'; '.join(r['compat'])}" if r.get("compat") else ""
            lines.append(f"- {r['side']} compile {r['compile']}: {r['params']:,} parameters, torch "
                         f"{r['torch_version']} on {r['device_name']}{extra}{compat}; {r['wall_s']:.0f} s wall")
        else:
            lines.append(f"- {r['side']} compile {r['compile']}: failed, log {r['log']}")
    return "\n".join(lines) + "\n"


def summarize(args, s: dict, runs: list[dict], compiles: list[str]) -> dict:
    fpt = flops_per_token(s)
    runs = [with_mfu(r, fpt) for r in runs]
    ratios = []
    for compile_ in compiles:
        pair = {r["side"]: r for r in runs if r["compile"] == compile_ and r["status"] == "ok"}
        if len(pair) == 2:
            b, t = pair["bench"], pair["torchtitan"]
            ratios.append({"compile": compile_, "tokens_per_s": ratio(b["tokens_per_s"], t["tokens_per_s"]),
                           "mfu": ratio(b["mfu_pct"], t["mfu_pct"]),
                           "peak_mem": ratio(b["peak_mem_mb"], t["peak_mem_mb"]),
                           "step_time": ratio(b["step_time_ms"], t["step_time_ms"])})
    try:
        from importlib.metadata import version

        titan_version = version("torchtitan")
    except Exception:  # not installed: the torchtitan runs say why
        titan_version = "(not installed)"
    return {
        "torchtitan_version": titan_version,
        "sizes": s,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": args.device,
        "tt_attn": args.tt_attn,
        "compiles": compiles,
        "compile_backend": compile_backend(args),
        "matmul_weights": matmul_weights(s),
        "flops_per_token": fpt,
        "flops_formula": "6N + 12*L*d*T",
        "peak_tflops": next((r["peak_tflops"] for r in runs if r.get("peak_tflops")), None),
        "runs": runs,
        "ratios": ratios,
    }


def main(args) -> None:
    s = model_sizes(args)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    compiles = ["off", "on"] if args.compile == "both" else [args.compile]
    runners = {"bench": run_bench, "torchtitan": run_titan}
    runs: list[dict] = []
    for i, compile_ in enumerate(compiles):
        order = SIDES if i % 2 == 0 else SIDES[::-1]  # alternate who runs first: neither always gets a cold machine
        for side in order:
            print(f"[vs_torchtitan] {side}, compile {compile_} ...", flush=True)
            run = runners[side](args, s, compile_ == "on", out)
            runs.append({"side": side, "compile": compile_, **run})
            if run["status"] != "ok":
                print(f"[vs_torchtitan] {side}, compile {compile_} failed: {run['error'][-400:]}", flush=True)
            report = summarize(args, s, runs, compiles)
            (out / "vs_torchtitan.json").write_text(json.dumps(report, indent=2) + "\n")
            (out / "vs_torchtitan.md").write_text(markdown(report))
    print(markdown(report))
    print(f"written: {out / 'vs_torchtitan.md'} and {out / 'vs_torchtitan.json'}")


# ------------------------------------------------------------------------------------- the torchtitan side (worker)


def torch_compat() -> list[str]:
    """Fill in, before torchtitan is imported, what torchtitan 0.3.0 (released against torch 2.14) reaches for
    and this torch lacks, only where it lacks it; returns what was filled in, for the results."""
    import torch.distributed.fsdp as fsdp

    filled = []
    if not hasattr(fsdp, "DataParallelMeshDims"):
        # imported at the top of torchtitan.distributed.fsdp/full_dtensor; given to fully_shard only with more than
        # one data-parallel rank (one device: resolve_fsdp_mesh returns None), so a bare stand-in is never used
        @dataclasses.dataclass(frozen=True)
        class DataParallelMeshDims:
            shard: str | tuple[str, ...] | None = None
            replicate: str | None = None

        fsdp.DataParallelMeshDims = DataParallelMeshDims
        filled.append("torch.distributed.fsdp.DataParallelMeshDims (stand-in, unused on one device)")
    return filled


def titan_worker(args) -> None:
    import torch
    import torch.distributed as dist

    compat = torch_compat()
    import spmd_types as spmd
    import torchtitan
    import torchtitan.distributed.parallel_dims as tt_parallel_dims
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.config.configs import CommConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.spmd_types import annotate_input_spmd_types
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import (
        _EMBEDDING_INIT,
        _NORM_INIT,
        Llama3Model,
        _build_llama3_layers,
        _output_linear_init,
        parallelize_llama,
    )
    from torchtitan.models.llama3.sharding import set_llama3_sharding_config

    s = model_sizes(args)
    if args.device == "cpu":
        # torchtitan takes "cuda" when no accelerator is visible (tools.utils.device_type); the CPU smoke run
        # points the two modules that build the process group and the mesh at the CPU (gloo)
        dist_utils.device_type = tt_parallel_dims.device_type = "cpu"
        compat.append("device_type 'cpu' in torchtitan.distributed.{utils,parallel_dims} (CPU run only)")
    if args.tt_attn == "flex":
        compat += flex_mask_compat()
    device = torch.device(args.device, int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist_utils.init_distributed(CommConfig(trace_buf_size=0))  # torchtitan's own: backend, autograd threading
    torch.manual_seed(0)

    parallelism = ParallelismConfig()  # torchtitan's defaults: FSDP over every rank, spmd_types backend
    parallel_dims = ParallelDims.from_config(parallelism, dist.get_world_size())
    dist_utils.set_spmd_backend(parallelism.spmd_backend)
    training = TrainingConfig(local_batch_size=args.batch, seq_len=s["seq_len"], steps=args.steps)

    # torchtitan's 8B flavour (models/llama3/__init__.py: _8b) at these sizes
    config = Llama3Model.Config(
        dim=s["dim"],
        vocab_size=s["vocab"],
        tok_embeddings=Embedding.Config(num_embeddings=s["vocab"], embedding_dim=s["dim"], param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=s["dim"], param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=s["dim"], out_features=s["vocab"], param_init=_output_linear_init(s["dim"])),
        layers=_build_llama3_layers(
            fuse_qkv=True,
            n_layers=s["layers"],
            dim=s["dim"],
            n_heads=s["heads"],
            n_kv_heads=s["kv_heads"],
            hidden_dim=s["ffn"],
            rope=ComplexRoPE.Config(dim=s["dim"] // s["heads"], max_seq_len=131072, theta=500000, scaling="llama"),
            attn_backend="flex",
        ),
    )
    for layer in config.layers:
        if args.tt_attn == "sdpa":
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
        # what Decoder.Config.update_from_config does for a Trainer.Config (its import pulls in the trainer and
        # with it datasets): the RoPE cache cut to the training sequence
        layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=s["seq_len"])
    set_llama3_sharding_config(config, enable_sp=parallelism.enable_sequence_parallel)

    with torch.device("meta"):
        model = config.build()
    model.verify_module_protocol()
    params = sum(p.numel() for p in model.parameters())
    _, titan_flops_per_token = config.get_nparams_and_flops(model, s["seq_len"])
    compile_on = args.worker_compile == "on"
    # the blocks compiled, as bench compiles them (the trainer's default also compiles the loss)
    model = parallelize_llama(
        model,
        parallel_dims=parallel_dims,
        training=training,
        parallelism=parallelism,
        compile_config=CompileConfig(enable=compile_on, components=["model"], backend=compile_backend(args)),
        ac_config=None,
        dump_folder=str(Path(args.worker_result).parent),
    )
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loss_fn = CrossEntropyLoss(CrossEntropyLoss.Config(global_vocab_size=s["vocab"]), compile_config=None)
    train_context = dist_utils.get_spmd_context(parallel_dims=parallel_dims, spmd_typechecking=False)

    gen = torch.Generator(device=device).manual_seed(1)
    batches = []
    for _ in range(4):  # as bench's synthetic data: a few distinct batches on the device, cycled
        tokens = torch.randint(0, s["vocab"], (args.batch, s["seq_len"] + 1), generator=gen, device=device)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    positions = torch.arange(s["seq_len"], device=device).expand(args.batch, -1).contiguous()
    valid_tokens = torch.tensor(args.batch * s["seq_len"], device=device)

    def step(i: int) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        inputs, labels = batches[i % len(batches)]
        extra = {"positions": positions}
        if args.tt_attn == "flex":  # the trainer builds the mask every step (post_dataloading_process)
            extra["attention_masks"] = model.get_attention_masks(positions=positions)
        inputs, labels, extra = annotate_input_spmd_types(parallel_dims, inputs, labels, extra)
        with train_context():  # the trainer's _forward_backward_body
            pred = model(inputs, **extra)
            loss, _ = loss_fn(pred, labels, valid_tokens)
            del pred
            with spmd.no_typecheck():
                loss.backward()
        optimizer.step()
        return loss.detach()

    cuda = device.type == "cuda"

    def mark():  # as bench's step clocks: CUDA events on the stream (read after the loop), else wall time
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the steps' peak, as bench's cuda_peak_allocated_mb
    marks, losses = [], []
    for i in range(args.steps):
        start = mark()
        losses.append(step(i))
        marks.append((start, mark()))
    if cuda:
        torch.cuda.synchronize()
        step_s = [a.elapsed_time(b) / 1e3 for a, b in marks]
        peak_mem_mb, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
        device_name = torch.cuda.get_device_name()
    else:
        step_s = [b - a for a, b in marks]
        peak_mem_mb, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss"
        device_name = "cpu"
    measured = step_s[args.warmup:]
    losses = torch.stack(losses).float().cpu().tolist()
    if dist.get_rank() == 0:
        Path(args.worker_result).write_text(json.dumps({
            "status": "ok",
            "tokens_per_s": args.batch * s["seq_len"] * len(measured) / sum(measured),
            "step_time_ms": 1e3 * sum(measured) / len(measured),
            "peak_mem_mb": peak_mem_mb,
            "peak_mem_kind": kind,
            "params": params,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "device_name": device_name,
            "torch_version": torch.__version__,
            "torchtitan_version": torchtitan.__version__,
            "own_flops_per_token": titan_flops_per_token,  # torchtitan's convention (norms' weights in N)
            "attention": args.tt_attn,
            "compat": compat,
        }, indent=2) + "\n")
    dist.destroy_process_group()


def flex_mask_compat() -> list[str]:
    """torch 2.11's create_block_mask takes no `separate_full_blocks` (it always separates full blocks, the value
    torchtitan passes outside batch-invariant mode); torchtitan 0.3.0's Decoder passes it."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    if "separate_full_blocks" in inspect.signature(create_block_mask).parameters:
        return []
    import torchtitan.models.common.decoder as tt_decoder

    compiled = torch.compile(create_block_mask)

    def create_attention_mask(*args, separate_full_blocks: bool = True, **kwargs):
        if not separate_full_blocks:
            raise NotImplementedError("this torch's create_block_mask always separates full blocks")
        return compiled(*args, **kwargs)

    tt_decoder.create_attention_mask = create_attention_mask
    return ["create_block_mask(separate_full_blocks=True) as this torch's default (no such argument)"]


if __name__ == "__main__":
    cli = parse_args()
    titan_worker(cli) if cli.worker else main(cli)
