"""profile=true's arithmetic on hand-made traces, whose answers are worked out in the comments: where each step's
time went, and stragglers. Real profiled runs: tests/integration/test_profile_runs.py."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.measure import intervals
from bench.measure.breakdown import analyse, breakdown_fields, stragglers
from bench.summary import profile_lines


def event(name, ts, dur, tid=1, cat="cpu_op", **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "cat": cat, "args": args}


def trace(*events, base_ns=10**12):
    return {"baseTimeNanoseconds": base_ns, "traceEvents": list(events)}


spans = st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), max_size=8)


@given(spans, spans)
def test_interval_arithmetic_keeps_inclusion_exclusion(a, b):
    a, b = intervals.union(a), intervals.union(b)
    both = intervals.length(intervals.intersect(a, b))
    assert intervals.length(intervals.union(a + b)) == intervals.length(a) + intervals.length(b) - both
    assert intervals.length(intervals.subtract(a, b)) == intervals.length(a) - both
    assert intervals.intersect(intervals.subtract(a, b), b) == []


def test_a_cpu_step_is_split_into_parts_that_sum_to_it():
    # µs on the training thread (tid 1) and gloo's thread (tid 2), one 100 µs step:
    t = trace(
        event("ProfilerStep#1", 0, 100, cat="user_annotation"),
        event("bench/data", 0, 5, cat="user_annotation"),
        event("aten::clone", 1, 3),                                   # compute 1-4
        event("FSDP::pre_forward (0)", 5, 35, cat="user_annotation"),  # a range holding a wait: not compute
        event("gloo:all_gather", 6, 24, tid=2, cat="user_annotation"),  # comm 6-30, nothing to hide it
        event("aten::copy_", 30, 5),                                  # compute 30-35
        event("aten::mm", 40, 20),                                    # compute 40-60, less the call 49-50
        event("c10d::allreduce_", 49, 1),                             # comm on the training thread
        event("gloo:all_reduce", 50, 20, tid=2, cat="user_annotation"),  # comm 50-70: 50-60 hidden
        event("autograd::engine::evaluate_function: MmBackward0", 70, 25),  # holds a hook's wait 70-80
        event("MmBackward0", 80, 15),                                 # compute 80-95
        event("c10d::send", 96, 1),                                   # a pipeline's send: comm, no straggler
    )
    (step,) = analyse(t)["steps"]
    assert step.pop("comm_by_collective_ms") == pytest.approx({"all_gather": 0.024, "all_reduce": 0.02}), "gloo's"
    # compute 3 + 5 + 9 + 10 + 15 = 42; comm 6-30 and 49-70 and 96-97 = 46, of which 50-60 hidden;
    # data 0-1 and 4-5 = 2; idle 5-6, 35-40, 70-80, 95-96, 97-100 = 20
    expected = {"step_ms": 100, "compute_ms": 42, "comm_ms": 46, "comm_exposed_ms": 36, "overlap_ms": 10,
                "data_wait_ms": 2, "idle_ms": 20}
    assert step == pytest.approx({k: v / 1e3 for k, v in expected.items()})
    assert step["compute_ms"] + step["comm_exposed_ms"] + step["data_wait_ms"] + step["idle_ms"] == \
        pytest.approx(step["step_ms"])
    assert analyse(t)["collectives"] == [[["c10d::allreduce_", 1e9 + 49]]], "entries in unix µs, no send"


def test_a_gpu_step_is_read_from_kernels_launched_inside_it():
    t = trace(
        event("ProfilerStep#1", 0, 50, cat="user_annotation"),
        event("ProfilerStep#2", 50, 50, cat="user_annotation"),
        event("ProfilerStep#1", 100, 200, tid=7, cat="gpu_user_annotation"),  # the device's copy of the range
        *(event("cudaLaunchKernel", ts, 1, cat="cuda_runtime", correlation=c) for ts, c in
          ((10, 1), (20, 2), (60, 3), (70, 4))),
        event("sm90_gemm", 100, 100, tid=7, cat="kernel", correlation=1, stream=7),
        event("ncclDevKernel_AllReduce_Sum_f32", 150, 110, tid=20, cat="kernel", correlation=2, stream=20),
        event("sm90_gemm", 300, 50, tid=7, cat="kernel", correlation=3, stream=7),
        event("Memcpy DtoD", 350, 10, tid=7, cat="gpu_memcpy", correlation=4, stream=7),
    )
    first, second = analyse(t)["steps"]
    assert first.pop("comm_by_collective_ms") == pytest.approx({"all_reduce": 0.11}), "NCCL's kernels, by name"
    assert second.pop("comm_by_collective_ms") == {"all_reduce": 0.0}
    # step 1 runs from its first kernel (100) to step 2's (300): gemm 100-200, NCCL 150-260 (50 hidden)
    assert first == pytest.approx({"step_ms": 0.2, "compute_ms": 0.1, "comm_ms": 0.11, "comm_exposed_ms": 0.06,
                                   "overlap_ms": 0.05, "data_wait_ms": 0.0, "idle_ms": 0.04})
    assert second == pytest.approx({"step_ms": 0.06, "compute_ms": 0.06, "comm_ms": 0.0, "comm_exposed_ms": 0.0,
                                    "overlap_ms": 0.0, "data_wait_ms": 0.0, "idle_ms": 0.0})


def test_the_straggler_is_the_rank_last_into_most_collectives():
    def step(*times):
        return [["c10d::allreduce_", times[0] * 1e3], ["c10d::broadcast_", times[1] * 1e3]]

    late = [
        [step(0, 10), step(100, 120), step(200, 210)],  # rank 0
        [step(5, 12), step(101, 121), step(205, 212)],  # rank 1: last in steps 0 and 2
        [step(1, 11), step(108, 125), step(201, 211)],  # rank 2: last in step 1
    ]
    found = stragglers(late)
    # rank 1 was last into 4 collectives, each time by (5 - 0.5) or (12 - 10.5) ms: 3 ms on average
    assert found == {"straggler_rank": 1, "straggler_share_pct": pytest.approx(200 / 3),
                     "straggler_late_ms": pytest.approx(3.0), "last_in": [[0, 0, 0], [2, 0, 2], [0, 2, 0]]}
    assert stragglers([late[0]])["straggler_rank"] is None, "one rank waits for nobody"
    no_collectives = stragglers([[[]], [[]]])
    assert no_collectives["straggler_rank"] is None and no_collectives["last_in"] == [[0], [0]]


def test_the_row_takes_shares_per_rank_then_their_mean():
    rank0 = {"step_ms": 100, "compute_ms": 60, "comm_ms": 30, "comm_exposed_ms": 20, "overlap_ms": 10,
             "data_wait_ms": 5, "idle_ms": 15}
    rank1 = {"step_ms": 80, "compute_ms": 40, "comm_ms": 40, "comm_exposed_ms": 40, "overlap_ms": 0,
             "data_wait_ms": 0, "idle_ms": 0}
    fields = breakdown_fields([[rank0], [rank1]])
    assert fields.pop("comm_by_collective_ms") == {}, "no collective named in these steps"
    assert fields == pytest.approx({
        "profile_steps": 1, "profile_step_time_ms": 100, "compute_pct": (60 + 50) / 2, "comm_pct": (30 + 50) / 2,
        "comm_exposed_pct": (20 + 50) / 2, "comm_exposed_pct_max": 50, "overlap_pct": 100 * 10 / 70,
        "profile_data_wait_pct": 2.5, "idle_pct": 7.5})
    rank0["comm_by_collective_ms"], rank1["comm_by_collective_ms"] = {"all_to_all": 4.0}, {"all_gather": 2.0}
    assert breakdown_fields([[rank0], [rank1]])["comm_by_collective_ms"] == {"all_gather": 1.0, "all_to_all": 2.0}


def test_the_summary_names_a_straggler_only_when_it_dominates():
    row = {"run_dir": "r", "profile_steps": 4, "straggler_rank": 1, "straggler_late_ms": 2.5}
    assert "straggler: rank 1 entered the collectives last in 4 of 4" in profile_lines(
        {**row, "straggler_share_pct": 100.0})
    assert "straggler" not in profile_lines({**row, "straggler_share_pct": 50.0})
    assert "r/traces/rank<N>.json.gz" in profile_lines({**row, "straggler_share_pct": None})


