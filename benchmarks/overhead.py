"""bench's own overhead: the same model, batch and steps timed by bench and by a bare training loop.

    python benchmarks/overhead.py --repeats 5 --steps 120 --warmup 20

For `single` (1 process) and `ddp` (2 ranks) it alternates bench runs and bare-loop runs (so drifts in
machine load hit both alike), then prints the median samples/s of each and their ratio. The bare loop
gets the environment bench gives its ranks (threads per rank, glibc mmap threshold), so the ratio is
the harness, not a different setting. Run it on an otherwise idle machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bench_run(strategy: str, nproc: int, steps: int, warmup: int, results: Path) -> float:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            f"strategy={strategy}",
            f"launch.nproc={nproc}",
            f"steps={steps}",
            f"warmup={warmup}",
            "progress=false",
            f"results_dir={results}",
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    last = (results / "runs.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["samples_per_s"]


def bare_run(nproc: int, steps: int, warmup: int) -> float:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // nproc)),
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    loop = [str(REPO / "benchmarks" / "bare_loop.py"), f"--steps={steps}", f"--warmup={warmup}"]
    if nproc == 1:
        cmd = [sys.executable, *loop]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *loop]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, nproc in (("single", 1), ("ddp", 2)):
            bench_rates, bare_rates = [], []
            for _ in range(args.repeats):
                bench_rates.append(bench_run(strategy, nproc, args.steps, args.warmup, Path(tmp)))
                bare_rates.append(bare_run(nproc, args.steps, args.warmup))
            bench_med, bare_med = statistics.median(bench_rates), statistics.median(bare_rates)
            print(
                f"{strategy:6s} nproc={nproc}: bench {bench_med:8.1f} samples/s, bare loop {bare_med:8.1f} "
                f"samples/s, ratio {bench_med / bare_med:.3f}  "
                f"(bench runs {[round(r) for r in bench_rates]}, bare {[round(r) for r in bare_rates]})"
            )


if __name__ == "__main__":
    main()
