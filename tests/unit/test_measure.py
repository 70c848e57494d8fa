"""The arithmetic behind the row, checked against hand-computed cases."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.measure import stats
from bench.measure import stats as metrics
from bench.measure.flops import _CPU_SDPA as CPU_SDPA
from bench.measure.flops import COUNTER_CONVENTION, count_step_flops, count_step_flops_and_experts, flop_counts
from bench.measure.memory import peak_by_kind_mb
from bench.measure.mfu import lookup_peak_tflops, mfu_pct, tflops_per_device
from bench.measure.rows import MEASURED_FIELDS, MEMORY_KINDS, measured_fields
from bench.models import build_model, loss_fn, model_spec
from bench.rank.peak import measured_peak_tflops


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
    rates = metrics.throughput(64, 3, 1.0, tokens_per_sample=128)
    assert rates["samples_per_s"] == pytest.approx(3 * 64 / 1.0)
    assert rates["tokens_per_s"] == pytest.approx(3 * 64 * 128 / 1.0)
    assert metrics.throughput(8, 1, 1.0, tokens_per_sample=None)["tokens_per_s"] is None


def test_the_steps_take_the_slowest_ranks_total_not_the_sum_of_per_step_maxima():
    # rank 1 is late in step 0 (0.2 s); rank 0 waits for it in step 1's collective (0.3 s): one hiccup of 0.1 s
    per_rank = [[0.10, 0.30], [0.20, 0.20]]
    assert metrics.slowest_rank_total(per_rank) == pytest.approx(0.4)
    assert sum(metrics.max_over_ranks(per_rank)) == pytest.approx(0.5), "the per-step maxima count it twice"


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


def test_mlp_flops_match_hand_count():
    cfg = {"name": "mlp", "in_features": 32, "hidden": 64, "layers": 3, "classes": 10}
    forward = 2 * (32 * 64 + 3 * 64 * 64 + 64 * 10)
    # backward: weight gradients for every layer, input gradients for all but the first (its input needs none)
    backward = forward + 2 * (3 * 64 * 64 + 64 * 10)
    assert count_step_flops(cfg) == pytest.approx(forward + backward)


def test_gpt_hardware_flops_include_attention():
    cfg = {"name": "gpt", "vocab_size": 100, "seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 4, "mlp_ratio": 4}
    t, d, layers, vocab = 16, 32, 2, 100
    linear = 6 * t * (layers * 12 * d * d + d * vocab)  # q,k,v,proj (4 d^2) + up/down (8 d^2); fwd + 2x bwd
    # QK^T and AV: 4 t^2 d forward; torch counts 10 t^2 d backward (flash attention recomputes QK^T)
    attention = layers * 14 * t * t * d
    assert count_step_flops(cfg) == pytest.approx(linear + attention)


def memory(total: float, **kinds: float) -> dict:
    return {**dict.fromkeys(MEMORY_KINDS, 0.0), **kinds, "total": total}


def rank_result(rank: int, step_time_s: list[float], loss: list[float] | None, **changes) -> dict:
    """What a rank hands in (see bench.rank.worker), with round numbers."""
    result = {
        "rank": rank, "devices": 1, "step_time_s": step_time_s, "data_wait_s": [0.0] * len(step_time_s),
        "loss": loss, "device_name": "Test GPU", "matmul_precision": "bf16", "measured_peak_tflops": None,
        "backend": "gloo", "params": 1000, "num_threads": 1, "cores": 2, "host": "testhost",
        "peak_rss_mb": 500.0, "baseline_rss_mb": 300.0, "setup_peak_mb": 50.0,
        "tracked_memory_mb": memory(40.0, params=10.0, grads=10.0, optim=20.0), "strategy_facts": {},
        "step_timer": "perf_counter", "torch_version": "x", "cuda_version": None, "nccl_version": None,
    }
    return {**result, **changes}


FLOPS = {"model_flops_per_sample": 1e9, "hardware_flops_per_sample": 1.5e9, "flops_convention": "test"}


def test_a_rows_numbers_from_its_ranks_by_hand():
    """Two ranks, 4 steps of which 2 warm-up; global batch 8 of sequences of 16 tokens; 1 GFLOP per sample by the
    model's convention, 1.5 executed."""
    cfg = {"warmup": 2, "global_batch": 8, "peak_tflops": 0.5,
           "model": {"name": "gpt", "seq_len": 16, "vocab_size": 8, "d_model": 8, "n_layers": 1, "n_heads": 1,
                     "mlp_ratio": 1}}
    ranks = [
        rank_result(0, [9.0, 9.0, 0.10, 0.30], [3.0, 2.0, 1.0, 0.5], peak_rss_mb=600.0, setup_peak_mb=80.0),
        rank_result(1, [9.0, 9.0, 0.20, 0.20], [1.0, 2.0, 3.0, 1.5],
                    tracked_memory_mb=memory(70.0, params=10.0, grads=10.0, optim=20.0, activations=30.0)),
    ]
    row = measured_fields(cfg, ranks, FLOPS, tokens_per_sample=16)
    assert set(row) - {"status", "warnings"} <= set(MEASURED_FIELDS)
    # a step lasts as long as its slowest rank (0.2 and 0.3 s: the percentiles), the two steps as long as the
    # slowest rank's total (0.4 s each: rank 0 waited in step 1 for rank 1's late step 0), mean 0.2 s
    assert (row["step_time_ms_p50"], row["step_time_ms_max"]) == (pytest.approx(250.0), pytest.approx(300.0))
    assert row["step_time_ms_mean"] == pytest.approx(200.0)
    assert row["samples_per_s"] == pytest.approx(2 * 8 / 0.4)
    assert row["samples_per_s_per_device"] == pytest.approx(20.0)
    assert row["tokens_per_s"] == pytest.approx(40 * 16)
    assert row["first_step_ms"] == pytest.approx(9000.0)
    # 8 GFLOP per step over 0.2 s on 2 devices: 20 GFLOP/s = 0.02 TFLOP/s each; against 0.5: 4 %
    assert (row["model_flops_per_step"], row["hardware_flops_per_step"]) == (8e9, 12e9)
    assert row["tflops_per_device"] == pytest.approx(0.02)
    assert (row["mfu_pct"], row["hfu_pct"]) == (pytest.approx(4.0), pytest.approx(6.0))
    assert (row["peak_tflops"], row["peak_source"], row["flops_convention"]) == (0.5, "given", "test")
    assert (row["loss_first"], row["loss_last"]) == (2.0, 1.0)  # the mean over the ranks' shards
    # memory: the breakdown of the rank holding most (rank 1), not a max per kind over ranks
    assert (row["peak_mem_mb"], row["mem_activations_mb"], row["mem_params_mb"]) == (70.0, 30.0, 10.0)
    assert row["peak_rss_mb"] == 600.0 and row["peak_rss_above_baseline_mb"] == 300.0
    assert row["setup_peak_mb"] == 80.0  # the rank that took the most before its first step
    assert row["cuda_peak_allocated_mb"] is None, "no CUDA figure off a GPU"
    assert row["oversubscribed"] is False, "2 ranks x 1 thread on 2 cores"


def test_more_threads_than_cores_on_a_host_is_said():
    cfg = {"warmup": 0, "global_batch": 4, "peak_tflops": 1.0, "model": {"name": "mlp"}}
    ranks = [rank_result(r, [0.1, 0.1], [1.0, 1.0], num_threads=2, cores=2) for r in range(2)]
    row = measured_fields(cfg, ranks, FLOPS, tokens_per_sample=None)
    assert row["oversubscribed"] is True
    assert "testhost: 2 ranks x threads = 4 threads on 2 cores" in row["warnings"][-1]


@pytest.mark.parametrize("requested,measured,expected", [
    (None, None, (None, None)),  # "Test GPU" is in no table
    ("measure", 0.25, (0.25, "measured")),
    (2, None, (2.0, "given")),
])
def test_the_peak_and_where_it_came_from(requested, measured, expected):
    cfg = {"warmup": 0, "global_batch": 2, "peak_tflops": requested, "model": {"name": "mlp"}}
    row = measured_fields(cfg, [rank_result(0, [0.1, 0.1], [1.0, 1.0], measured_peak_tflops=measured)], FLOPS, None)
    assert (row["peak_tflops"], row["peak_source"]) == expected
    assert (row["mfu_pct"] is None) == (expected[0] is None)


def test_a_known_gpu_takes_the_table_and_an_unknown_device_says_how_to_get_an_mfu():
    cfg = {"warmup": 0, "global_batch": 2, "peak_tflops": None, "model": {"name": "mlp"}}
    h100 = rank_result(0, [0.1, 0.1], [1.0, 1.0], device_name="NVIDIA H100 80GB HBM3")
    assert measured_fields(cfg, [h100], FLOPS, None)["peak_source"] == "table"
    row = measured_fields(cfg, [rank_result(0, [0.1, 0.1], [1.0, 1.0])], FLOPS, None)
    assert row["mfu_pct"] is None and row["tokens_per_s"] is None
    assert "pass peak_tflops=measure" in row["warnings"][0]


# ------------------------------------------------------------------------------------------- FLOP conventions

GPT = {"name": "gpt", "vocab_size": 100, "seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 4, "mlp_ratio": 4}


def test_gpt_model_flops_reconcile_with_the_counter_where_conventions_coincide():
    """The analytic 6NT + 12LT^2d and FlopCounterMode's count both take attention's whole T x T square (causal
    masking does not change what the fused kernels compute); they differ only in flash attention's backward,
    which recomputes QK^T. The causal count is the masked half of the scores less."""
    t, d, layers = GPT["seq_len"], GPT["d_model"], GPT["n_layers"]
    counted = count_step_flops(GPT)
    model = model_spec(GPT).model_flops_per_sample(GPT)
    flash_recompute = 2 * layers * t * t * d  # QK^T again in flash attention's backward
    assert counted - model == pytest.approx(flash_recompute)
    causal_half = 6 * layers * t * t * d  # the masked half of the scores, forward and backward
    assert model - model_spec(GPT).model_flops_per_sample(GPT, causal=True) == causal_half


def test_a_gpt_mixture_of_experts_counts_the_router_and_the_top_k_experts_a_token_passes_through():
    """4 experts, top 2, on fake tensors (the counter's) spread evenly: the counter sees 2 experts' gated MLPs
    per token (3 d x 4d matrices each) and the router (d x 4), as the formula counts them."""
    moe = {**GPT, "experts": 4, "top_k": 2}
    t, d, layers = GPT["seq_len"], GPT["d_model"], GPT["n_layers"]
    dense_ff, moe_ff = 2 * d * 4 * d, d * 4 + 2 * 3 * d * 4 * d
    analytic = model_spec(moe).model_flops_per_sample(moe)
    assert analytic - model_spec(GPT).model_flops_per_sample(GPT) == 6 * t * layers * (moe_ff - dense_ff)
    assert count_step_flops(moe) - analytic == pytest.approx(2 * layers * t * t * d), "flash's recompute, as dense"
    _, experts = count_step_flops_and_experts(moe)
    # the part of them the experts compute (the busiest rank's more); the counter's module tracker lays a little of
    # attention's backward (t x t x d a layer) at the experts' door
    assert experts == pytest.approx(6 * t * layers * 2 * 3 * d * 4 * d, rel=0.01)
    assert count_step_flops_and_experts(GPT)[1] == 0


# What the published conventions give per token, worked out from the published sizes alone (no bench code):
# torchtitan 0.3.0's get_dense_model_nparams_and_flops, 6 * (parameters - embedding parameters) + 12 * L * H * Q * T
# ("we follow the convention and do not account for sparsity in causal attention"), on Llama 3 8B (L 32, d 4096,
# 32 heads of 128, 8 key/value heads, feed-forward 14336, vocabulary 128256, untied): N = 7,504,924,672.
TORCHTITAN_LLAMA3_8B = {2048: 48_250_773_504, 8192: 57_914_449_920}
# nanoGPT's estimate_mfu, 6N + 12 * L * H * Q * T with N its non-embedding parameters (123,653,376: every weight
# but the position embedding, the tied token embedding counted once, biases and norms included), GPT-2 124M, T 1024.
NANOGPT_GPT2_124M = 855_166_464


@pytest.mark.parametrize("seq_len", sorted(TORCHTITAN_LLAMA3_8B))
def test_model_flops_are_torchtitans_on_llama3_8b(seq_len):
    """bench's count leaves out the norms (266,240 weights of 7.5 billion): 0.003 % apart."""
    from conftest import compose_plain

    cfg = compose_plain("model=llama3-8b", f"model.seq_len={seq_len}")["model"]
    per_token = model_spec(cfg).model_flops_per_sample(cfg) / seq_len
    assert per_token == pytest.approx(TORCHTITAN_LLAMA3_8B[seq_len], rel=1e-3)


def test_model_flops_are_nanogpts_on_gpt2_124m():
    """nanoGPT counts biases and norms too (0.09 % of its count)."""
    from conftest import compose_plain

    cfg = compose_plain("model=gpt2")["model"]
    assert cfg["seq_len"] == 1024
    per_token = model_spec(cfg).model_flops_per_sample(cfg) / 1024
    assert per_token == pytest.approx(NANOGPT_GPT2_124M, rel=5e-3)


def test_hardware_flops_count_the_recompute_of_activation_checkpointing():
    """Checkpointed blocks run their forward again in backward: the hardware count grows by what is recomputed,
    the model count does not. torch's non-reentrant checkpoint stops recomputing once it has every tensor the
    backward needs, so each block's last matmul (the feed-forward's down projection, whose output backward does
    not need) is not run again: q, k, v, proj and up (8d^2 weights) and the attention forward are."""
    plain, checkpointed = flop_counts(GPT, False), flop_counts(GPT, True)
    assert plain["model_flops_per_sample"] == checkpointed["model_flops_per_sample"]
    t, d, layers = GPT["seq_len"], GPT["d_model"], GPT["n_layers"]
    recomputed = layers * (2 * t * 8 * d * d + 4 * t * t * d)
    assert checkpointed["hardware_flops_per_sample"] - plain["hardware_flops_per_sample"] == recomputed


def test_models_without_an_analytic_count_use_the_counter():
    cfg = {"name": "mlp", "in_features": 32, "hidden": 64, "layers": 3, "classes": 10}
    counts = flop_counts(cfg, False)
    assert counts["model_flops_per_sample"] == counts["hardware_flops_per_sample"] == count_step_flops(cfg)
    assert counts["flops_convention"] == COUNTER_CONVENTION


def test_counting_on_fake_tensors_equals_counting_a_real_step():
    cfg = dict(GPT)
    torch.manual_seed(0)
    model = build_model(cfg)
    x, y = model_spec(cfg).synthetic_batch(cfg, 1, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        loss_fn(model(x), y).backward()
    assert count_step_flops(cfg) == counter.get_total_flops()


# DeepSeek-V3 with fewer key/value heads than heads (and qk_nope + qk_rope = v_head_dim): a real step's SDPA skips
# the causal mask and takes the grouped-query path; on fake tensors transformers builds the mask and, with it,
# repeats the key/value heads its attention already has in full (4 x 2 against 4 query heads)
DEEPSEEK_V3 = ("model=hf", "model.seq_len=16", "model.config.model_type=deepseek_v3", "model.config.vocab_size=128",
               "model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_hidden_layers=2",
               "model.config.num_attention_heads=4", "model.config.num_key_value_heads=2",
               "+model.config.q_lora_rank=32", "+model.config.kv_lora_rank=16", "+model.config.qk_rope_head_dim=8",
               "+model.config.qk_nope_head_dim=8", "+model.config.v_head_dim=16", "+model.config.n_routed_experts=4",
               "+model.config.num_experts_per_tok=2", "+model.config.moe_intermediate_size=32",
               "+model.config.first_k_dense_replace=1", "+model.config.n_group=1", "+model.config.topk_group=1")


def test_a_model_the_counter_cannot_run_on_fake_tensors_keeps_its_analytic_count():
    from conftest import compose_plain

    cfg = compose_plain(*DEEPSEEK_V3)["model"]
    counts = flop_counts(cfg, False)
    assert counts["model_flops_per_sample"] == model_spec(cfg).model_flops_per_sample(cfg) > 0
    assert counts["flops_convention"] == model_spec(cfg).flops_convention
    assert (counts["hardware_flops_per_sample"], counts["flops_method"]) == (None, "model_flops_per_sample")
    assert counts["flops_error"].startswith("FlopCounterMode on fake tensors: RuntimeError: The size of tensor a")


def test_a_count_that_fails_is_null_with_its_reason_and_the_row_is_kept(monkeypatch):
    """Nothing counts a model without an analytic count whose step fails on fake tensors: every FLOP field of its
    row is null, the row says why, and the rest of the row stands."""
    def fails(*args):
        raise RuntimeError("no fake kernel\nits stack")

    monkeypatch.setattr("bench.measure.flops.count_whole_step_flops", fails)
    counts = flop_counts({"name": "mlp", "in_features": 32, "hidden": 64, "layers": 3, "classes": 10}, True)
    assert counts == {"model_flops_per_sample": None, "model_flops_causal_per_sample": None,
                      "hardware_flops_per_sample": None, "expert_flops_per_sample": None, "flops_convention": None,
                      "flops_method": None,
                      "flops_error": "FlopCounterMode on fake tensors: RuntimeError: no fake kernel"}
    gpt = flop_counts(GPT, False)  # the GPT has an analytic count: its model FLOPs stand
    assert (gpt["model_flops_per_sample"], gpt["hardware_flops_per_sample"], gpt["flops_method"]) == (
        model_spec(GPT).model_flops_per_sample(GPT), None, "model_flops_per_sample")
    cfg = {"warmup": 1, "global_batch": 8, "peak_tflops": 0.5, "model": GPT}
    row = measured_fields(cfg, [rank_result(0, [1.0, 0.5], [2.0, 1.0])], counts, tokens_per_sample=16)
    assert row["step_time_ms_mean"] == 500.0 and row["flops_method"] is None
    flop_fields = ("model_flops_per_step", "model_flops_causal_per_step", "hardware_flops_per_step",
                   "flops_convention", "tflops_per_device", "hardware_tflops_per_device", "mfu_pct", "mfu_causal_pct",
                   "hfu_pct")
    assert [row[field] for field in flop_fields] == [None] * len(flop_fields)
    assert row["warnings"] == ["flops: FlopCounterMode on fake tensors: RuntimeError: no fake kernel; counted by "
                               "nothing, the FLOP fields it cannot give are null"]


# ------------------------------------------------------------------------------------------- repeats


def test_t_quantiles_and_the_95_percent_interval_by_hand():
    assert stats.t_975(1) == 12.706 and stats.t_975(30) == 2.042
    assert stats.t_975(40) == pytest.approx(2.021, abs=1e-3) and stats.t_975(120) == pytest.approx(1.980, abs=1e-3)
    # 10, 12, 14: mean 12, s = 2, half-width t(0.975, 2) * 2 / sqrt(3) = 4.303 * 1.1547 = 4.9687
    low, high = stats.confidence_interval_95([10.0, 12.0, 14.0])
    assert (low, high) == (pytest.approx(12 - 4.9687, abs=1e-4), pytest.approx(12 + 4.9687, abs=1e-4))
    assert stats.confidence_interval_95([5.0]) is None


# ------------------------------------------------------------------------------------------- memory, peak


def test_memory_by_kind_from_a_trackers_peak_snapshot():
    from torch.distributed._tools.mem_tracker import _MemRefType

    mib = 2**20
    snapshot = {
        torch.device("cpu"): {_MemRefType.PARAM: 2 * mib, _MemRefType.OPT: 4 * mib, "Total": 6 * mib},
        torch.device("meta"): {_MemRefType.PARAM: 1 * mib, "Total": 1 * mib},
    }
    by_kind = peak_by_kind_mb(snapshot)
    assert (by_kind["params"], by_kind["optim"], by_kind["total"], by_kind["grads"]) == (2.0, 4.0, 6.0, 0.0)


def test_a_measured_peak_is_cached_per_host_device_and_precision(tmp_path):
    first = measured_peak_tflops(str(tmp_path), "cpu", "Test CPU", "fp32", measure=True)
    assert first > 0
    (cached,) = (tmp_path / ".cache" / "peak").iterdir()
    assert "Test-CPU_fp32" in cached.name
    assert measured_peak_tflops(str(tmp_path), "cpu", "Test CPU", "fp32", measure=False) == first
