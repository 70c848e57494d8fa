"""The cases of the one multirun that tests/integration/test_parity.py, test_profile_runs.py and test_plan_runs.py
share (fixture `strategy_rows` in conftest.py): every strategy against one device under verify=true, some of them
also profiled (profile.enabled), so the profiling tests cost no launch of their own.

One case per strategy is generated from its spec: `<strategy>_gpt`, its own knobs and degrees on 2 ranks (1 for a
strategy of one process), against the one-device baseline `single`, whose run is every case's reference. A
strategy added as one module and one config is in the multirun with no edit here; the variants below add what a
strategy's defaults do not reach (other models, schedules, knobs, 2-D layouts)."""

from bench.strategies import strategy_names, strategy_spec

COMMON = ["steps=4", "warmup=1", "global_batch=16", "launch.omp_num_threads=1"]  # verify: per case, on by default

CASES = {f"{name}_gpt": {"strategy": name, "model": "gpt", "launch.nproc": 1 if strategy_spec(name).single_process
                         else 2} for name in strategy_names() if name != "single"}  # the reference itself
# case -> its overrides as config lines. Strategy and model are config groups: `override /x: y`.
CASES.update({
    "single_mlp": {"strategy": "single", "model": "mlp"},
    # FSDP x tensor parallel within each stage of 3-D: fsdp_tp_pp_gpt below, and on a Llama in
    # tests/integration/test_your_model_runs.py (fsdp_tp_pp_llama)
    "tensor_sp_gpt": {"strategy": "tensor", "model": "gpt", "launch.nproc": 2, "strategy.sequence_parallel": True},
    # gradient accumulation, activation checkpointing and torch.compile (aot_eager: seconds, not minutes) on data
    # read from files, 4 steps per epoch: the second epoch reshuffles
    "ddp_knobs_files_cnn": {"strategy": "ddp", "model": "cnn", "launch.nproc": 2, "grad_accum": 2,
                            "activation_checkpointing": True, "compile": True, "compile_backend": "aot_eager",
                            "data": "files", "steps": 6, "data.samples": 64},
    "fsdp_bf16_gpt": {"strategy": "fsdp", "model": "gpt", "launch.nproc": 2, "precision": "bf16", "verify": False},
    # HSDP (2 replicas of 2 shards) with ZeRO-2's gather-once; offload, which changes nothing on the CPU
    "hsdp_zero2_gpt": {"strategy": "fsdp", "model": "gpt", "launch.nproc": 4, "parallel.dp_replicate": 2,
                       "strategy.reshard_after_forward": False, "strategy.offload": True},
    # context parallelism: 2 replicas of 2 ranks each holding half of every sequence, FSDP over the 4
    "fsdp_cp_gpt": {"strategy": "fsdp", "model": "gpt", "launch.nproc": 4, "parallel.cp": 2},
    # expert parallelism on bench's own GPT with a mixture of experts: each rank 2 of each block's 4 experts, the
    # attention split over 2 tp ranks, FSDP over the 2 replicas
    "fsdp_ep_tp_moe_gpt": {"strategy": "fsdp", "model": "gpt", "launch.nproc": 4, "parallel.tp": 2, "parallel.ep": 2,
                           "model.experts": 4},
    # pipeline: the other schedules on the MLP (pipeline_gpt: GPipe on the GPT), and 3-D on the GPT
    "1f1b_mlp": {"strategy": "pipeline", "model": "mlp", "launch.nproc": 2, "strategy.schedule": "1f1b",
                 "strategy.microbatches": 16},  # micro-batches of one sample
    "interleaved_mlp": {"strategy": "pipeline", "model": "mlp", "launch.nproc": 2, "strategy.schedule": "interleaved",
                        "strategy.stages_per_rank": 2, "strategy.microbatches": 16},
    # zero bubble: two stages per rank in a V, each backward split into its input and weight gradients
    "zbv_mlp": {"strategy": "pipeline", "model": "mlp", "launch.nproc": 2, "strategy.schedule": "zbv",
                "strategy.stages_per_rank": 2, "strategy.microbatches": 16},
    # 3-D: 2 replicas FSDP-sharded x 2 tensor-parallel ranks x 2 stages (torchtitan's order)
    "fsdp_tp_pp_gpt": {"strategy": "pipeline", "model": "gpt", "launch.nproc": 8, "parallel.dp": 2, "parallel.tp": 2,
                       "parallel.pp": 2, "strategy.fsdp": True},
    # refused: global_batch=16 does not split into 2 replicas x 16 micro-batches; the sweep records it, goes on
    "1f1b_dp_mlp": {"strategy": "pipeline", "model": "mlp", "launch.nproc": 4, "parallel.dp": 2, "parallel.pp": 2,
                    "strategy.schedule": "1f1b", "strategy.microbatches": 16},
})
REFUSED = ("1f1b_dp_mlp",)

# Profiled as well (tests/integration/test_profile_runs.py): no communication, DDP's all-reduce, FSDP's all-gathers
# and reduce-scatters, tensor parallelism's collectives.
PROFILE_STEPS = 2
PROFILED_CASES = ("single_mlp", "ddp_gpt", "fsdp_gpt", "tensor_gpt")
for _name in PROFILED_CASES:
    CASES[_name].update({"profile.enabled": True, "profile.steps": PROFILE_STEPS})
