"""The arithmetic behind the row, checked against hand-computed cases."""

import math

import pytest
import torch

from bench.measure import stats as metrics
from bench.measure.flops import train_flops_per_sample
from bench.measure.mfu import lookup_peak_tflops, mfu_pct, tflops_per_device
from bench.measure.rows import MEASURED_FIELDS, measured_fields
from bench.models import build_model, model_spec


def test_percentiles_interpolate_linearly():
    values = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert metrics.percentile(values, 50) == 30.0
    assert metrics.percentile(values, 90) == pytest.approx(46.0)  # pos 3.6: 40 + 0.6 * 10
    assert metrics.percentile(values, 99) == pytest.approx(49.6)
    assert metrics.percentile([3.0, 1.0, 2.0], 0) == 1.0


def test_step_time_stats_in_milliseconds():
    stats = metrics.step_time_stats_ms([0.010, 0.020, 0.030, 0.040])
    assert stats["step_time_ms_mean"] == pytest.approx(25.0)
    assert stats["step_time_ms_p50"] == pytest.approx(25.0)
    assert stats["step_time_ms_p90"] == pytest.approx(37.0)  # pos 2.7: 30 + 0.7 * 10
    assert stats["step_time_ms_std"] == pytest.approx(math.sqrt(500 / 3))  # sample std, n-1
    assert (stats["step_time_ms_min"], stats["step_time_ms_max"]) == pytest.approx((10.0, 40.0))


def test_a_step_lasts_as_long_as_its_slowest_rank():
    assert metrics.max_over_ranks([[1.0, 5.0, 2.0], [3.0, 1.0, 2.5]]) == [3.0, 5.0, 2.5]
    with pytest.raises(ValueError, match="different numbers of steps"):
        metrics.max_over_ranks([[1.0, 2.0], [1.0]])


def test_throughput_is_work_over_time():
    rates = metrics.throughput(64, [0.5, 0.25, 0.25], tokens_per_sample=128)
    assert rates["samples_per_s"] == pytest.approx(3 * 64 / 1.0)
    assert rates["tokens_per_s"] == pytest.approx(3 * 64 * 128 / 1.0)
    assert metrics.throughput(8, [1.0], tokens_per_sample=None)["tokens_per_s"] is None


def test_mfu_arithmetic():
    # 6e12 FLOPs per global step, 2 s per step, 3 devices -> 1 TFLOP/s per device; against 4 -> 25 %.
    achieved = tflops_per_device(6e12, 2.0, 3)
    assert achieved == pytest.approx(1.0)
    assert mfu_pct(achieved, 4.0) == pytest.approx(25.0)
    assert mfu_pct(achieved, None) is None


def test_peak_table_matches_whole_names_only():
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert lookup_peak_tflops("NVIDIA A10G", "bf16") is None  # not the A10: no guess
    assert lookup_peak_tflops("AMD EPYC 7B13", "fp32") is None


def _sample(cfg):
    return model_spec(cfg).synthetic_batch(cfg, 3, torch.Generator().manual_seed(0))


def test_mlp_flops_match_hand_count():
    cfg = {"name": "mlp", "in_features": 32, "hidden": 64, "layers": 3, "classes": 10}
    forward = 2 * (32 * 64 + 3 * 64 * 64 + 64 * 10)
    # backward: weight gradients for every layer, input gradients for all but the first (its input needs none)
    backward = forward + 2 * (3 * 64 * 64 + 64 * 10)
    assert train_flops_per_sample(build_model(cfg), *_sample(cfg)) == pytest.approx(forward + backward)


def test_gpt_flops_include_attention():
    cfg = {"name": "gpt", "vocab_size": 100, "seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 4, "mlp_ratio": 4}
    t, d, layers, vocab = 16, 32, 2, 100
    linear = 6 * t * (layers * 12 * d * d + d * vocab)  # q,k,v,proj (4 d^2) + up/down (8 d^2); fwd + 2x bwd
    # QK^T and AV: 4 t^2 d forward; torch counts 10 t^2 d backward (flash attention recomputes QK^T)
    attention = layers * 14 * t * t * d
    model = build_model(cfg)
    assert train_flops_per_sample(model, *_sample(cfg)) == pytest.approx(linear + attention)
    assert all(p.grad is None for p in model.parameters()), "counting must leave no gradients behind"


def rank_result(rank: int, step_time_s: list[float], loss: list[float] | None, **changes) -> dict:
    """What a rank hands in (see bench.rank.worker), with round numbers."""
    result = {
        "rank": rank, "devices": 1, "step_time_s": step_time_s, "data_wait_s": [0.0] * len(step_time_s),
        "loss": loss, "flops_per_sample": 1e9, "device_name": "Test GPU", "matmul_precision": "bf16",
        "backend": "gloo", "params": 1000, "num_threads": 1, "peak_rss_mb": 500.0, "baseline_rss_mb": 300.0,
        "mem_params_mb": 10.0, "mem_grads_mb": 10.0, "mem_optim_mb": 20.0, "strategy_facts": {},
        "torch_version": "x", "cuda_version": None, "nccl_version": None,
    }
    return {**result, **changes}


def test_a_rows_numbers_from_its_ranks_by_hand():
    """Two ranks, 4 steps of which 2 warm-up; global batch 8 of sequences of 16 tokens; 1 GFLOP per sample."""
    cfg = {"warmup": 2, "global_batch": 8, "peak_tflops": 0.5,
           "model": {"name": "gpt", "seq_len": 16, "vocab_size": 8, "d_model": 8, "n_layers": 1, "n_heads": 1,
                     "mlp_ratio": 1}}
    ranks = [
        rank_result(0, [9.0, 9.0, 0.10, 0.30], [3.0, 2.0, 1.0, 0.5], peak_rss_mb=600.0),
        rank_result(1, [9.0, 9.0, 0.20, 0.20], [1.0, 2.0, 3.0, 1.5]),
    ]
    row = measured_fields(cfg, ranks)
    assert set(row) - {"status", "warnings"} <= set(MEASURED_FIELDS)
    # a step lasts as long as its slowest rank: 0.2 and 0.3 s, mean 0.25 s
    assert row["step_time_ms_mean"] == pytest.approx(250.0)
    assert row["samples_per_s"] == pytest.approx(2 * 8 / 0.5)
    assert row["samples_per_s_per_device"] == pytest.approx(16.0)
    assert row["tokens_per_s"] == pytest.approx(32 * 16)
    assert row["first_step_ms"] == pytest.approx(9000.0)
    # 8 GFLOP per step over 0.25 s on 2 devices: 16 GFLOP/s = 0.016 TFLOP/s each; against 0.5: 3.2 %
    assert row["tflops_per_device"] == pytest.approx(0.016)
    assert row["mfu_pct"] == pytest.approx(3.2)
    assert (row["loss_first"], row["loss_last"]) == (2.0, 1.0)  # the mean over the ranks' shards
    assert row["peak_mem_mb"] == 600.0 and row["peak_rss_above_baseline_mb"] == 300.0
    assert row["mem_activations_mb"] == pytest.approx(300.0 - 40.0)  # the peak above start-up, less what is held


def test_an_unknown_device_gets_no_mfu_and_says_why():
    cfg = {"warmup": 0, "global_batch": 2, "peak_tflops": None, "model": {"name": "mlp"}}
    row = measured_fields(cfg, [rank_result(0, [0.1, 0.1], [1.0, 1.0])])
    assert row["mfu_pct"] is None and row["tokens_per_s"] is None
    assert "pass peak_tflops=<number>" in row["warnings"][0]
