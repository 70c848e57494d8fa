"""bench's own overhead: the same model, global batch and steps run by bench and by a bare hand-written loop
started the plain way a user starts it (plain `python`, plain `torchrun --standalone`), both in the
environment this script was started in, unchanged.

    python benchmarks/overhead.py --repeats 8

For each case (MLP and GPT; one process and DDP on 2 ranks) it runs bench and the bare loop in pairs, back to
back, taking turns at going first, so that drifts in machine load hit both alike. It prints a Markdown table:
the median samples/s of each (over the steps after the warm-up), the median of the pairs' ratios (robust to
a drift that moves both runs of a pair), and the median wall time of the whole process, start-up included,
with the median of its pair ratios. Run it on an otherwise idle machine.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = [  # model, global batch, strategy, ranks
    ("mlp", 64, "single", 1),
    ("mlp", 64, "ddp", 2),
    ("gpt", 32, "single", 1),
    ("gpt", 32, "ddp", 2),
]


def timed(cmd: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return out, time.perf_counter() - start


def bench_run(model: str, batch: int, strategy: str, nproc: int, steps: int, warmup: int, results: Path):
    cmd = [sys.executable, "-m", "bench", f"model={model}", f"global_batch={batch}", f"strategy={strategy}",
           f"launch.nproc={nproc}", f"steps={steps}", f"warmup={warmup}", "progress=false", f"results_dir={results}"]
    _, wall = timed(cmd)
    last = (results / "runs.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["samples_per_s"], wall


def bare_run(model: str, batch: int, nproc: int, steps: int, warmup: int):
    loop = [str(REPO / "benchmarks" / "bare_loop.py"), f"--model={model}", f"--global-batch={batch}",
            f"--steps={steps}", f"--warmup={warmup}"]
    if nproc == 1:
        cmd = [sys.executable, *loop]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *loop]
    out, wall = timed(cmd)
    return json.loads(out.strip().splitlines()[-1])["samples_per_s"], wall


def spread(ratios: list[float]) -> str:
    """The pair ratios' quartiles and range: how far one pair can be from the median on this machine."""
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return f"{q1:.3f}–{q3:.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--models", default="mlp,gpt")
    args = parser.parse_args()
    print("| model | strategy | ranks | pairs | bench samples/s | bare samples/s | ratio (median of pairs) | "
          "pair ratios: quartiles [min, max] | bench wall s | bare wall s | wall ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model, batch, strategy, nproc in CASES:
            if model not in args.models.split(","):
                continue
            bench, bare = [], []
            for i in range(args.repeats):
                for side in ("bench", "bare") if i % 2 == 0 else ("bare", "bench"):
                    if side == "bench":
                        bench.append(bench_run(model, batch, strategy, nproc, args.steps, args.warmup, Path(tmp)))
                    else:
                        bare.append(bare_run(model, batch, nproc, args.steps, args.warmup))
            rate_b, rate_p = (statistics.median(r for r, _ in runs) for runs in (bench, bare))
            wall_b, wall_p = (statistics.median(w for _, w in runs) for runs in (bench, bare))
            ratios = [b[0] / p[0] for b, p in zip(bench, bare, strict=True)]
            wall_ratio = statistics.median(b[1] / p[1] for b, p in zip(bench, bare, strict=True))
            print(f"| {model} | {strategy} | {nproc} | {len(ratios)} | {rate_b:,.0f} | {rate_p:,.0f} | "
                  f"{statistics.median(ratios):.3f} | {spread(ratios)} | {wall_b:.2f} | {wall_p:.2f} | "
                  f"{wall_ratio:.2f} |", flush=True)
            print(f"<!-- {model} {strategy}: bench {[round(r) for r, _ in bench]}, bare {[round(r) for r, _ in bare]}"
                  " -->", flush=True)


if __name__ == "__main__":
    main()
