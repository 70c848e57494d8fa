"""The collectives benchmark in-process: the buffers' expected values, nccl-tests' bandwidth arithmetic, its rows,
and the refusal of one rank. Its real 2-rank runs on gloo: tests/integration/test_comm_runs.py."""

import pytest
import torch

from bench.comm.collectives import COLLECTIVES, buffers, element_count, message_sizes, variants
from bench.comm.controller import prepare, rows_from_result
from bench.errors import ConfigError
from bench.measure.bandwidth import bandwidths, busbw_factor
from conftest import compose_plain

N_FACTORS = [
    ("all_reduce", 2, 1.0),
    ("all_reduce", 4, 1.5),
    ("all_reduce", 8, 1.75),
    ("all_gather", 4, 0.75),
    ("reduce_scatter", 8, 0.875),
    ("all_to_all", 2, 0.5),
    ("broadcast", 8, 1.0),
]


@pytest.mark.parametrize("collective,n,factor", N_FACTORS)
def test_busbw_factors_are_nccl_tests(collective, n, factor):
    assert busbw_factor(collective, n) == pytest.approx(factor)


def test_bandwidths_from_size_and_time():
    # 1 GB all_reduce over 8 ranks in 0.1 s: algbw 10 GB/s, busbw 10 * 2 * 7 / 8 = 17.5 GB/s
    bw = bandwidths("all_reduce", 10**9, 0.1, 8)
    assert bw["algbw_gbps"] == pytest.approx(10.0)
    assert bw["busbw_gbps"] == pytest.approx(17.5)


def test_message_sizes_and_counts():
    assert message_sizes(1024, 8192) == [1024, 2048, 4096, 8192]
    assert message_sizes(1000, 5000) == [1024, 2048, 4096]
    assert element_count("all_reduce", 4096, 4, 3) == 1024
    assert element_count("all_gather", 4096, 4, 3) == 1023, "split evenly between 3 ranks"
    assert element_count("all_to_all", 8, 4, 3) == 0, "too small to split: skipped"


def test_rows_carry_the_arithmetic_and_skipped_collectives():
    base = {"warnings": [], "status": None, "error": None}
    result = {
        "world_size": 4,
        "backend": "gloo",
        "device_name": "cpu",
        "num_threads": 1,
        "torch_version": "x",
        "cuda_version": None,
        "nccl_version": None,
        "warnings": [],
        "measurements": [
            {
                "collective": "all_gather",
                "variant": "all_gather_single",
                "size_bytes": 4096,
                "count": 1024,
                "time_s_max_rank": 2e-6,
                "time_s_min_rank": 1e-6,
            }
        ],
        "skipped": {"reduce_scatter": "backend gloo runs none of its variants: ..."},
    }
    ok, skipped = rows_from_result(base, result)
    assert ok["status"] == "ok" and ok["time_us"] == pytest.approx(2.0)
    assert ok["algbw_gbps"] == pytest.approx(4096 / 2e-6 / 1e9)
    assert ok["busbw_gbps"] == pytest.approx(ok["algbw_gbps"] * 3 / 4)
    assert skipped["status"] == "skipped" and skipped["collective"] == "reduce_scatter" and skipped["error"]


def simulate(collective: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """What each rank's output holds after the collective, computed here from every rank's input."""
    n = len(inputs)
    if collective == "all_reduce":
        return [sum(inputs)] * n
    if collective == "broadcast":
        return [inputs[0]] * n
    if collective == "all_gather":
        return [torch.cat(inputs)] * n
    if collective == "reduce_scatter":
        return list(sum(inputs).chunk(n))
    if collective == "all_to_all":
        return [torch.cat([inputs[j].chunk(n)[r] for j in range(n)]) for r in range(n)]
    raise ValueError(collective)


@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("n", [2, 3])
def test_each_ranks_expected_values_are_what_the_collective_computes(collective, n):
    count = element_count(collective, 24 * 4, 4, n)
    laid_out = [buffers(collective, count, n, rank, torch.float32, "cpu") for rank in range(n)]
    for rank, out in enumerate(simulate(collective, [b.input.clone() for b in laid_out])):
        assert torch.equal(laid_out[rank].expected, out)
        assert laid_out[rank].output.shape == out.shape


@pytest.mark.parametrize("collective", COLLECTIVES)
def test_every_collective_has_a_variant_this_torch_offers(collective):
    names = [name for name, _ in variants(collective)]
    assert names and all(hasattr(torch.distributed, name) for name in names)


def test_one_rank_is_refused_before_launch():
    with pytest.raises(ConfigError, match="launch.nproc: expected a world of at least 2 ranks"):
        prepare(compose_plain(config_name="comm"))


def test_progress_is_taken_as_python_m_bench_takes_it():
    """`progress=false` on a command line shared with `python -m bench` is accepted (bench.comm has no bar to
    show); a value that is not a bool is refused as bench refuses a bad value."""
    assert prepare(compose_plain("launch.nproc=2", "progress=false", config_name="comm"))["progress"] is False
    with pytest.raises(ConfigError, match="^progress: expected true or false, got 'maybe'"):
        prepare(compose_plain("launch.nproc=2", "progress=maybe", config_name="comm"))
