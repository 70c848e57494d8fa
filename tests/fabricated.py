"""Fabricated results, as bench writes them: runs.jsonl rows with a resolved config and a run folder with its
steps.csv, for the report's tests (tests/unit/test_report.py, tests/integration/test_report_cli.py). Each measured
step of a run takes global_batch / samples_per_s seconds, so a run's steps agree with its row."""

import csv
import json
from pathlib import Path

DEVICE, HOST = "Test CPU", "testhost"
STEPS, WARMUP = 6, 2


class Sweep:
    """A fake sweep folder: `add(...)` writes one run (folder, steps.csv) and appends its row."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def add(
        self,
        strategy="ddp",
        nproc=1,
        global_batch=64,
        sps=None,
        mem=500.0,
        status="ok",
        repeat=0,
        error=None,
        device_name=DEVICE,
        host=HOST,
        loss_offset=None,
        fields=None,
        options=None,
        **config_changes,
    ) -> dict:
        run_dir = self.folder / f"{self.count}_{strategy}_mlp"
        self.count += 1
        run_dir.mkdir()
        config = {
            "strategy": {"name": strategy},
            "model": {"name": "mlp", "in_features": 512, "hidden": 1024, "layers": 4, "classes": 10},
            "data": {"name": "synthetic", "num_batches": 4},
            "launch": {"name": "local", "nnodes": 1, "nproc": nproc, "omp_num_threads": None, "rdzv_timeout_s": 120},
            "steps": STEPS,
            "warmup": WARMUP,
            "global_batch": global_batch,
            "seed": 0,
            "device": "cpu" if status != "skipped" else "auto",
            "results_dir": str(self.folder),
            "progress": repeat % 2 == 0,  # run-specific: must not split repeats
            "peak_tflops": None,
            "repeat": repeat,
            "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
        }
        config["strategy"].update(options or {})
        for key, value in config_changes.items():
            config[key] = value
        ok = status == "ok"
        loss = [2.0 - 0.1 * i + 0.01 * (repeat if loss_offset is None else loss_offset) for i in range(STEPS)]
        row = {
            "run_id": run_dir.name,
            "status": status,
            "error": error,
            "strategy": strategy,
            "model": "mlp",
            "world_size": nproc,
            "nproc": nproc,
            "nnodes": 1,
            "global_batch": global_batch,
            "steps": STEPS,
            "warmup": WARMUP,
            "device": config["device"],
            "host": host,
            "run_dir": str(run_dir),
            "config": config,
            "device_name": device_name if ok else None,
            "samples_per_s": sps if ok else None,
            "tokens_per_s": None,
            "step_time_ms_p50": 1e3 * global_batch / sps if ok else None,
            "step_time_ms_p90": 1e3 * global_batch / sps if ok else None,
            "peak_mem_mb": mem if ok else None,
            "mfu_pct": None,
            "loss_last": loss[-1] if ok else None,
        }
        row.update(fields or {})
        if ok:
            step_ms = 1e3 * global_batch / sps
            with (run_dir / "steps.csv").open("w", newline="") as f:
                out = csv.writer(f)
                out.writerow(
                    ["step", "measured", "step_time_ms", "loss", "data_wait_ms_max"]
                    + [f"step_time_ms_rank{r}" for r in range(nproc)]
                )
                for i in range(STEPS):
                    out.writerow([i, int(i >= WARMUP), step_ms, loss[i], 0.0] + [step_ms] * nproc)
        with (self.folder / "runs.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def scaling_sweep_in(folder: Path) -> Path:
    """Strong and weak scaling, repeats, a failed repeat, a failed and a skipped configuration."""
    s = Sweep(folder / "sweep")
    for repeat, (sps, mem) in enumerate([(100, 500), (110, 520), (90, 510)]):
        s.add("single", 1, 64, sps, mem, repeat=repeat)
    s.add("ddp", 1, 64, 95, 530)
    for repeat, sps in enumerate([160, 180, 170]):
        s.add("ddp", 2, 64, sps, 600, repeat=repeat)
    s.add("ddp", 2, 64, status="failed", repeat=3, error="rank 1: boom")
    s.add("single", 2, 64, status="skipped", error="launch.nproc: expected 1 with strategy=single")
    s.add("ddp", 4, 64, status="failed", error="rank 3: exited with code 3")
    s.add("single", 1, 32, 90, 400)
    s.add("ddp", 1, 32, 85, 410)
    s.add("ddp", 2, 32, 150, 420)
    return s.folder


def two_sides(tmp_path, base_sps, cand_sps, base_mem=1000.0, cand_mem=1000.0, **cand_kwargs):
    base, cand = Sweep(tmp_path / "base"), Sweep(tmp_path / "cand")
    for i, sps in enumerate(base_sps):
        base.add("ddp", 2, 64, sps, base_mem, repeat=i)
    for i, sps in enumerate(cand_sps):
        cand.add("ddp", 2, 64, sps, cand_mem, repeat=i, **cand_kwargs)
    return base.folder, cand.folder
