"""The cases of the one multirun that tests/test_parity.py and tests/test_profile.py share (fixture
`strategy_rows` in conftest.py): every strategy against one device under verify=true, some of them also
profiled (profile.enabled), so the profiling tests cost no launch of their own."""

COMMON = ["steps=4", "warmup=1", "global_batch=16", "launch.omp_num_threads=1"]  # verify: per case, on by default

# case -> (the case's overrides as config lines, ...). Strategy and model are config groups: `override /x: y`.
CASES = {
    **{f"{s}_{m}": {"strategy": s, "model": m, "launch.nproc": 2} for s in ("ddp", "fsdp") for m in ("mlp", "gpt")},
    **{f"{s}_gpt": {"strategy": s, "model": "gpt", "launch.nproc": 2} for s in ("zero", "tensor")},
    "single_mlp": {"strategy": "single", "model": "mlp"},
    # FSDP x tensor parallel on 4 ranks: tests/test_your_model.py (fsdp_tp_llama)
    "tensor_sp_gpt": {"strategy": "tensor", "model": "gpt", "launch.nproc": 2, "strategy.sequence_parallel": True},
    # gradient accumulation, activation checkpointing and torch.compile (aot_eager: seconds, not minutes)
    "ddp_knobs_gpt": {"strategy": "ddp", "model": "gpt", "launch.nproc": 2, "grad_accum": 2,
                      "activation_checkpointing": True, "compile": True, "compile_backend": "aot_eager"},
    "dataparallel_mlp": {"strategy": "dataparallel", "model": "mlp"},
    # 4 steps per epoch: the second epoch reshuffles
    **{f"{s}_files_cnn": {"strategy": s, "model": "cnn", "launch.nproc": 2, "data": "files", "steps": 6,
                          "data.samples": 64} for s in ("ddp",)},
    **{f"{s}_bf16_gpt": {"strategy": s, "model": "gpt", "launch.nproc": 2, "precision": "bf16", "verify": False}
       for s in ("fsdp",)},
    # pipeline: every schedule and the 2-D dp x pp mesh on the MLP, the GPT (same code path) on GPipe
    "gpipe_mlp": {"strategy": "pipeline", "model": "mlp", "launch.nproc": 2},
    "1f1b_mlp": {"strategy": "pipeline", "model": "mlp", "launch.nproc": 2, "strategy.schedule": "1f1b",
                 "strategy.microbatches": 16},  # micro-batches of one sample
    "interleaved_mlp": {"strategy": "pipeline", "model": "mlp", "launch.nproc": 2, "strategy.schedule": "interleaved",
                        "strategy.stages_per_rank": 2, "strategy.microbatches": 16},
    "gpipe_dp_mlp": {"strategy": "pipeline", "model": "mlp", "launch.nproc": 4, "parallel.dp": 2, "parallel.pp": 2},
    # refused: global_batch=16 does not split into 2 replicas x 16 micro-batches; the sweep records it, goes on
    "1f1b_dp_mlp": {"strategy": "pipeline", "model": "mlp", "launch.nproc": 4, "parallel.dp": 2, "parallel.pp": 2,
                    "strategy.schedule": "1f1b", "strategy.microbatches": 16},
    "gpipe_gpt": {"strategy": "pipeline", "model": "gpt", "launch.nproc": 2},
    # one process, two stages on the one CPU, with the split-size trick
    **{f"modelparallel_{m}": {"strategy": "modelparallel", "model": m, "strategy.split_size": 4}
       for m in ("mlp", "gpt")},
}

# Profiled as well (tests/test_profile.py): no communication, DDP's all-reduce, FSDP's all-gathers and
# reduce-scatters, tensor parallelism's collectives.
PROFILE_STEPS = 3
PROFILED_CASES = ("single_mlp", "ddp_mlp", "fsdp_mlp", "tensor_gpt")
for _name in PROFILED_CASES:
    CASES[_name].update({"profile.enabled": True, "profile.steps": PROFILE_STEPS})
