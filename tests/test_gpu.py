"""The CUDA paths: nccl, CUDA memory figures, bf16 autocast, compile. Skipped cleanly without a GPU."""

import pytest
import torch
from conftest import read_rows, run_bench

pytestmark = [
    pytest.mark.slow,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible here)"),
]

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run(tmp_path, *overrides):
    proc = run_bench("device=cuda", "steps=6", "warmup=2", *overrides, results_dir=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_rows(tmp_path / "runs.jsonl")[-1]


def test_cuda_run_reports_cuda_memory_and_mfu(tmp_path):
    row = _run(tmp_path, "model=gpt", "global_batch=16")
    assert row["backend"] == "nccl" and row["device_name"].startswith("NVIDIA")
    assert row["peak_mem_reserved_mb"] >= row["peak_mem_mb"] > 0 and row["cuda_ooms"] == 0
    assert row["mfu_pct"] is None or 0 < row["mfu_pct"] < 100


def test_bf16_autocast_and_compile_on_cuda(tmp_path):
    row = _run(tmp_path, "model=gpt", "global_batch=16", "precision=bf16", "compile=true")
    assert row["matmul_precision"] == "bf16" and 0 < row["loss_last"] < 10


@pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero", "tensor", "pipeline"])
def test_nccl_strategies_keep_parity(tmp_path, strategy):
    row = _run(tmp_path, f"strategy={strategy}", "launch.nproc=2", "model=gpt", "++model.n_layers=4",
               "global_batch=16", "verify=true")
    assert row["backend"] == "nccl" and row["parity_ok"], row["parity_max_rel_diff"]


@pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA devices")
def test_dataparallel_drives_every_gpu(tmp_path):
    row = _run(tmp_path, "strategy=dataparallel", "strategy.devices=2", "model=cnn")
    assert row["devices"] == 2 and row["strategy_facts"]["device_ids"] == [0, 1]
