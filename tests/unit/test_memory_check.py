"""The memory check before a run, in-process: it never skips silently. A step that cannot run on fake tensors is
checked against a bound instead, fp16 is predicted as bf16 is, and the prediction itself allocates nothing and
leaves nothing behind in the controller. The simulated predictions themselves: tests/unit/test_plan.py."""

import resource
import sys

import pytest
import torch
from torch import nn

from bench.errors import ConfigError
from bench.plan.memory import memory_refusal, predicted_memory_mb
from bench.run import Run, prepare
from conftest import compose_plain


def run_of(*overrides: str, results_dir) -> Run:
    """The run `python -m bench <overrides>` would resolve (its memory not checked)."""
    return prepare(compose_plain(*overrides, "force=true", f"results_dir={results_dir}"))


class ChecksItsGradient(torch.autograd.Function):
    """The identity, whose backward reads a value of its gradient (as a loss scaler's inf check does): the forward
    runs on fake tensors, the backward cannot (DataDependentOutputException)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if not torch.isfinite(grad).all().item():
            raise FloatingPointError("a gradient that is not finite")
        return grad


class ReadsValues(nn.Module):
    """A user's model (model=custom) whose step cannot be simulated: its blocks' outputs, width x seq_len fp32
    values a sample, are what its bound counts of activations."""

    def __init__(self, vocab: int = 64, width: int = 32, depth: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = ChecksItsGradient.apply(self.embed(tokens))
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


READS_VALUES = ("model=custom", f"model.module._target_={__name__}.ReadsValues", "model.inputs.vocab_size=64",
                "model.inputs.seq_len=16")


def test_a_step_that_cannot_run_on_fake_tensors_is_checked_against_a_bound(tmp_path):
    """Where the simulation fails, the memory check gets a floor made of what cannot fail: the weights (fp32),
    their gradients and SGD's momentum, whole on one rank, and each block's output for the batch (the larger of
    gradients and activations: zero_grad frees the gradients before the forward). The planner still sees no
    prediction: it prices a simulation's traced collectives."""
    run = run_of(*READS_VALUES, results_dir=tmp_path)
    bound, why = predicted_memory_mb(run, fallback=True)
    assert why.startswith("DataDependentOutputException on fake tensors: aten._local_scalar_dense.default; the "
                          "bound: weights, gradients and optimizer state whole (one rank), 2 block output(s) x 64 "
                          "sample(s) held for backward")
    weights = sum(p.numel() for p in ReadsValues().parameters()) * 4 / 2**20
    activations = 2 * 64 * 16 * 32 * 4 / 2**20
    assert bound["method"] == "bound"
    assert (bound["params"], bound["grads"], bound["optim"]) == pytest.approx((weights, weights, weights))
    assert bound["activations"] == pytest.approx(activations)
    assert bound["total"] == pytest.approx(2 * weights + max(weights, activations))
    assert "a bound (its step not simulated) of" in memory_refusal(bound, bound["total"] * 0.99, "x")
    assert memory_refusal(bound, bound["total"], "x") is None
    predicted, not_simulated = predicted_memory_mb(run)
    assert predicted is None and not_simulated.startswith("memory not predicted: DataDependentOutputException")


def test_fp16_is_predicted_as_bf16_and_the_long_gpt_refused(tmp_path):
    """fp16's loss scaler reads `.item()` before it steps, which no fake tensor has: the prediction failed and the
    check was skipped, so `python -m bench model=gpt model.seq_len=100000 precision=fp16` ran out of RAM. Simulated
    stepping as a run steps, fp16 holds what bf16 holds, and that command is refused as its bf16 twin is."""
    from bench.controller import check_memory

    small = {p: predicted_memory_mb(run_of("model=gpt", f"precision={p}", results_dir=tmp_path))[0]
             for p in ("bf16", "fp16")}
    assert small["fp16"]["method"] == "simulated"
    for kind in ("params", "grads", "optim", "activations", "temp", "total"):
        assert small["fp16"][kind] == pytest.approx(small["bf16"][kind], abs=1e-3), kind  # the scale's 4 bytes
    long = run_of("model=gpt", "model.seq_len=100000", "precision=fp16", "memory_limit_gb=64", results_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"got a predicted peak of 102\.9 GB on rank 0"):
        check_memory(long)


def test_a_huge_model_is_predicted_without_allocating_it(tmp_path):
    """model.seq_len=2**31: GPT's position embedding alone is 1 TiB, and building the model on the meta device
    asked for it for real (a parameter is moved to meta only once registered). The simulation, the pipeline's
    and the bound count it with this process's address space held to 4 GiB past what it holds already."""
    from bench.measure.memory import no_large_tensors
    from bench.plan.bound import bound_mb

    with no_large_tensors():  # the pipeline's own check builds the model too (bench.strategies.stages)
        runs = [run_of("model=gpt", f"model.seq_len={2**31}", *more, results_dir=tmp_path)
                for more in ((), ("strategy=pipeline", "launch.nproc=2"))]
    with open("/proc/self/status") as f:
        held = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = held + 4 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        predicted = [predicted_memory_mb(run) for run in runs]
        bound, _ = bound_mb(runs[0], "forced")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    embedding = 2**31 * 128 * 4 / 2**20
    for memory, why in predicted:
        assert why == "" and memory["method"] == "simulated", why
        assert memory["total"] >= embedding  # the pipeline's largest rank: at least its first stage
    assert bound["params"] >= embedding


def test_the_simulation_leaves_the_controllers_excepthook_alone(tmp_path):
    """init_process_group wraps sys.excepthook to prefix every line with `[rank0]: `, and destroying the group
    leaves it wrapped: after a sweep of N runs, the controller's tracebacks carried the prefix N times."""
    hook = sys.excepthook
    for nproc in (1, 2):
        predicted, _ = predicted_memory_mb(run_of("model=gpt", "strategy=fsdp", f"launch.nproc={nproc}",
                                                  results_dir=tmp_path))
        assert predicted is not None
    assert sys.excepthook is hook


def test_a_run_checked_against_a_bound_says_so_once_or_is_refused(tmp_path):
    from bench.controller import check_memory

    run = run_of(*READS_VALUES, results_dir=tmp_path)
    prepared = check_memory(run)
    (warning,) = prepared.warnings
    assert warning.startswith("memory: checked against a bound, not simulated: DataDependentOutputException on fake "
                              "tensors: aten._local_scalar_dense.default; the bound: weights, gradients and optimizer "
                              "state whole (one rank), 2 block output(s) x 64 sample(s) held for backward")
    assert prepared.predicted_memory_mb is None
    with pytest.raises(ConfigError, match=r"got a bound \(its step not simulated\) of 0\.0 GB on rank 0"):
        check_memory(run.replace(memory_limit_gb=1e-4))
