"""Each rank's memory predicted before the run (`bench.plan.memory`), against what the runs measured, and the
refusal of a run predicted not to fit."""

import json
import shutil

import pytest

from bench.controller import prepare
from bench.plan.memory import SIMULATED, memory_refusal, predicted_memory_mb
from conftest import compose_plain, read_rows, run_bench
from strategy_cases import CASES, COMMON

# one worker runs this module's tests and shares its multirun (pytest-xdist, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("strategy_cases")

# The cases of the shared multirun whose strategy is predicted: their measured peaks are the reference (the
# files-data case too: its batches are predicted as the synthetic ones, shaped alike).
PREDICTED = [name for name, case in CASES.items()
             if case["strategy"] in (*SIMULATED, "ddp", "zero", "pipeline")
             and name != "1f1b_dp_mlp"]  # that one is refused, a `skipped` row


def case_overrides(case: dict, results_dir) -> list[str]:
    """The case as command-line overrides; the predictions' cache under `results_dir`."""
    pairs = (f"{key}={value}" for key, value in case.items() if not isinstance(value, dict))
    return [*COMMON, *pairs, "force=true", f"results_dir={results_dir}"]


@pytest.fixture(scope="module")
def measured_collectives(tmp_path_factory):
    """This machine's collectives over 2 gloo ranks, measured once (`python -m bench.comm`): what
    `plan.network=measured` fits."""
    folder = tmp_path_factory.mktemp("comm")
    proc = run_bench("launch.nproc=2", "comm.max_bytes=65536", module="bench.comm", results_dir=folder)
    assert proc.returncode == 0, proc.stderr
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", PREDICTED)
def test_the_prediction_is_within_ten_percent_of_the_measured_peak(strategy_rows, name, tmp_path):
    row = strategy_rows[name]
    assert row["status"] == "ok", row["error"]
    predicted = predicted_memory_mb(prepare(compose_plain(*case_overrides(CASES[name], tmp_path))))
    assert predicted["total"] == pytest.approx(row["peak_mem_mb"], rel=0.10), (predicted, row["peak_mem_mb"])


def test_a_run_predicted_not_to_fit_is_refused_in_one_line_before_it_starts(tmp_path):
    """The issue's case: a 100,000-token GPT sequence grew one rank to 18.4 GB of this machine's 23 GB."""
    proc = run_bench("model=gpt", "model.seq_len=100000", "force=false", results_dir=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("bench: invalid config: memory: expected a run that fits in ") and "force=true" in line
    assert not list(tmp_path.rglob("ranks")), "no rank started"


def test_the_refusal_names_the_prediction_and_what_to_change():
    predicted = {"params": 512.0, "grads": 0.0, "optim": 512.0, "activations": 20480.0, "temp": 0.5, "total": 21504.5}
    assert memory_refusal(predicted, 32768.0, "x") is None
    line = memory_refusal(predicted, 8192.0, "8.0 GB available on this machine / 1 rank(s)")
    assert line == ("memory: expected a run that fits in 8.0 GB per rank (8.0 GB available on this machine / 1 "
                    "rank(s)), got a predicted peak of 21.0 GB on rank 0 (params 0.50, optim 0.50, activations "
                    "20.00 GB). Lower global_batch or the model's sizes, or shard it (strategy=fsdp, zero, tensor), "
                    "or pass force=true to run anyway.")


def test_one_process_over_several_gpus_is_not_predicted():
    """nn.DataParallel gathers every output on device 0, and modelparallel's stages each hold their own share:
    neither is one device's simulation, so neither is predicted (the run goes on without the check)."""
    from bench.plan.memory import predict

    assert predict({"strategy": {"name": "dataparallel", "devices": 2}, "device": "cuda"}) is None


@pytest.mark.parametrize("pp,per_rank,count", [(2, 2, 4), (2, 2, 16), (3, 2, 6), (4, 3, 8), (4, 2, 16)])
def test_the_interleaved_order_is_torchs_own(pp, per_rank, count):
    """The simulated interleaved 1F1B runs each rank's forwards and backwards in the order torch's
    ScheduleInterleaved1F1B computes for it (its pipeline_order, without its stages or process group)."""
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType

    from bench.plan.pipeline import schedule_order

    schedule = object.__new__(ScheduleInterleaved1F1B)
    schedule.n_local_stages, schedule.pp_group_size, schedule._n_microbatches = per_rank, pp, count
    schedule.number_of_rounds = max(1, count // pp)
    schedule.microbatches_per_round = count // schedule.number_of_rounds
    for rank in range(pp):
        torchs = [("F" if action.computation_type == _ComputationType.FORWARD else "B", action.stage_index // pp)
                  for action in schedule._calculate_single_rank_operations(rank) if action is not None]
        assert schedule_order("interleaved", pp, rank, count, per_rank) == torchs


def test_a_prediction_is_cached_by_what_it_depends_on(tmp_path):
    cfg = prepare(compose_plain("force=true", f"results_dir={tmp_path}"))
    first = predicted_memory_mb(cfg)
    (cached,) = (tmp_path / ".cache" / "memory").glob("*.json")
    assert predicted_memory_mb({**cfg, "steps": 99}) == first, "steps change nothing predicted"
    cached.write_text('{"predicted": {"total": 1.0}}')
    assert predicted_memory_mb(cfg) == {"total": 1.0}, "read back, not simulated again"
    assert predicted_memory_mb({**cfg, "global_batch": 32})["total"] < first["total"]


@pytest.mark.slow
def test_bench_plan_lists_each_layout_and_agrees_with_the_measured_runs(tmp_path, strategy_rows,
                                                                       measured_collectives):
    import pandas as pd

    from bench.plan.__main__ import main


    # this machine's collectives, measured (bench.comm), and the shared multirun's rows, as a user's results hold
    shutil.copy(measured_collectives / "comm.jsonl", tmp_path)
    with (tmp_path / "runs.jsonl").open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in strategy_rows.values())
    assert main([*COMMON, "model=gpt", "plan.world_sizes=[1,2,1024]", "plan.activation_checkpointing=[false]",
                 "plan.device_tflops=0.05", f"results_dir={tmp_path}"]) == 0
    (folder,) = (tmp_path / "plans").iterdir()
    table = pd.read_csv(folder / "plan.csv")
    plan = table[table["world_size"] <= 2].set_index("strategy")
    assert sorted(plan.index) == ["ddp", "fsdp", "fsdp", "pipeline", "single", "tensor", "zero"]
    assert plan.loc["pipeline", "status"] == "fits" and plan.loc["pipeline", "predicted_bubble_ms"] > 0
    two = plan[plan["world_size"] == 2]
    assert "single" not in two.index and plan.loc["single", "predicted_comm_ms"] == 0
    assert two.loc["tensor", "predicted_comm_ms"] > two.loc["ddp", "predicted_comm_ms"] > 0, "TP: every layer"
    assert ((two["predicted_step_ms"] - two["overhead_ms"]) / two["overhead_factor"]
            >= two["predicted_compute_ms"]).all(), "before calibration"
    assert (folder / "projection.png").stat().st_size > 10_000
    refused = table[table["world_size"] == 1024].set_index("strategy")
    assert set(refused["status"]) == {"refused"}, "global_batch=16 does not split over 1,024 ranks"
    for name in ("ddp", "fsdp", "zero", "tensor", "pipeline"):  # the same configs as the multirun's cases, 2 ranks
        assert two.loc[name, "status"] == "fits"
        measured = strategy_rows[f"{name}_gpt" if name != "pipeline" else "gpipe_gpt"]["peak_mem_mb"]
        assert two.loc[name, "predicted_peak_mb"] == pytest.approx(measured, rel=0.10), name
    assert two.loc["fsdp", "optim_mb"] == pytest.approx(plan.loc["single", "optim_mb"] / 2, rel=0.01), "sharded"

    # bench.plan.check: the same layouts' predictions beside these runs. The GPT has no run at another world
    # size, and other models' runs do not calibrate a throughput assumed (plan.device_tflops): all a priori.
    from bench.plan.check import main as check

    assert check([*COMMON, "model=gpt", "plan.world_sizes=[2]", "plan.activation_checkpointing=[false]",
                  "plan.device_tflops=0.05", f"results_dir={tmp_path}"]) == 0
    (checked,) = (tmp_path / "plans").glob("*_check")
    table = pd.read_csv(checked / "check.csv").set_index("strategy")
    assert sorted(table.index) == ["ddp", "fsdp", "pipeline", "tensor", "zero"]
    assert (table["runs"] == 1).all(), "tensor_sp_gpt is another variant of tensor, not this layout's run"
    assert (table["memory_error_pct"].abs() < 10).all()
    assert table.loc["ddp", "measured_step_ms"] == strategy_rows["ddp_gpt"]["step_time_ms_p50"]
    assert (table["calibrated_by"] == "nothing measured to calibrate by").all()
    assert (table["calibrated_step_ms"] == table["predicted_step_ms"]).all()
    assert "layouts: step time a priori |error| mean" in (checked / "check.md").read_text()


def test_a_strategy_is_calibrated_by_its_own_runs_else_by_other_models_measured_runs(tmp_path):
    """Rows as `python -m bench` writes them (the configs it runs, the fields the plan reads): the MLP's single
    and DDP runs, the GPT's single run. The GPT's DDP has no run of its own at another world size, so the MLP's
    DDP run calibrates it by its measured - predicted per block and core; with the GPT's own DDP run at 4
    ranks, that one does, by its measured / predicted."""
    from bench.models import count_blocks
    from bench.plan.__main__ import prepare_plan
    from bench.plan.steptime import StepTimeModel, core_share, machine_cores

    common = ["global_batch=16", "launch.omp_num_threads=1", "force=true", f"results_dir={tmp_path}"]
    base, _, network, device = prepare_plan(["model=gpt", "plan.network=h100-nvlink-ib400", *common])
    model = StepTimeModel(base, network, device, None)

    def planned(cfg: dict) -> dict:
        return {**cfg, "device": base["device"], "backend": base["backend"]}

    def row(*overrides: str, step_ms: float | None = None, factor: float = 1.0, plus_ms: float = 0.0) -> dict:
        cfg = prepare(compose_plain(*overrides, *common))
        if step_ms is None:  # what the model predicts of this run from the rows written so far, x factor + ms
            time, _, source = model.predict(planned(cfg), predicted_memory_mb(cfg))
            assert source.startswith("measured"), source
            step_ms = factor * time["step_ms"] + plus_ms
        return {"status": "ok", "device_name": device, "config": cfg, "model": cfg["model"]["name"],
                "world_size": cfg["launch"]["nproc"], "global_batch": 16, "omp_num_threads": machine_cores(),
                "hardware_flops_per_step": 1e9, "step_time_ms_p50": step_ms}

    def append(*rows: dict) -> None:
        with (tmp_path / "runs.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    append(row("model=mlp", step_ms=100.0), row("model=gpt", step_ms=200.0))
    mlp_ddp = row("model=mlp", "strategy=ddp", "launch.nproc=2", plus_ms=30.0)
    append(mlp_ddp)
    gpt_ddp = planned(prepare(compose_plain("model=gpt", "strategy=ddp", "launch.nproc=2", *common)))
    expected = (30.0 * core_share(mlp_ddp["config"]) / count_blocks(mlp_ddp["config"]["model"])
                * count_blocks(gpt_ddp["model"]) / core_share(gpt_ddp))
    factor, ms, source = model.overhead(gpt_ddp)
    assert factor == 1 and ms == pytest.approx(expected)
    assert source == f"{ms:+.1f} ms: ddp's measured - predicted per block and core of mlp at 2 rank(s) (1 run(s))"
    append(row("model=gpt", "strategy=ddp", "launch.nproc=4", factor=0.8))
    factor, ms, source = model.overhead(gpt_ddp)
    assert factor == pytest.approx(0.8) and ms == 0 and source.endswith("gpt at 4 rank(s) (1 run(s))")


def test_bench_plan_refuses_what_it_cannot_plan_in_one_line(tmp_path):
    proc = run_bench("plan.strategies=[nope]", module="bench.plan", results_dir=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "bench.plan: invalid config: plan.strategies: expected some of single, ddp, zero, fsdp, tensor, pipeline, "
        "got ['nope']. Change `plan.strategies=` on the command line."]


# ----------------------------------------------------------------------------- step time: the arithmetic


def test_one_collective_costs_latency_plus_its_bus_bytes_over_the_bandwidth():
    from bench.plan.network import Link, Network

    net = Network("t", "by hand", gpus_per_node=4, intra={"*": {2: Link(10, 100)}}, inter={"*": {2: Link(20, 10)}})
    # 2 all-reduces of 1 GB in all over 4 ranks of one node: 2 x 10 us + 2(4-1)/4 x 1e9 B / 100 GB/s
    assert net.call_s("all_reduce", 4, 2, 1e9) == pytest.approx(2 * 10e-6 + 1.5 * 1e9 / 100e9)
    # over 8 ranks the ring crosses nodes: the inter-node link sets both numbers
    assert net.call_s("all_reduce", 8, 2, 1e9) == pytest.approx(2 * 20e-6 + 1.75 * 1e9 / 10e9)
    assert net.call_s("all_gather", 4, 1, 4e6) == pytest.approx(10e-6 + 0.75 * 4e6 / 100e9)
    assert net.call_s("p2p", 2, 3, 3e6) == pytest.approx(3 * 10e-6 + 3e6 / 100e9), "a send moves its bytes once"
    assert net.call_s("all_reduce", 1, 5, 1e9) == 0, "one rank: nothing to talk to"


def test_the_fit_recovers_the_latency_and_bandwidth_it_was_made_from():
    from bench.plan.network import fit

    sizes = [2**k for k in range(10, 23)]
    link = fit([(x, 50 + x / 2e3) for x in sizes])  # 50 us + bytes at 2 GB/s (2e3 bytes per us)
    assert link.latency_us == pytest.approx(50, rel=1e-6) and link.busbw_gbps == pytest.approx(2, rel=1e-6)


def test_ddp_zero_and_pipeline_collectives_are_counted_from_the_model():
    from bench.plan.collectives import per_step

    def cfg(name, **strategy):
        return {"strategy": {"name": name, **strategy}, "parallel": {"dp": 1 if name == "pipeline" else 4, "tp": 1,
                "pp": 2 if name == "pipeline" else 1}, "global_batch": 64, "grad_accum": 2}

    grads = 4.0 * 10_000_000  # 10 M fp32 gradients: a 1 MiB first bucket, then 25 MiB ones
    assert per_step(cfg("ddp", bucket_cap_mb=25), 10_000_000, 120, None) == [
        {"collective": "all_reduce", "ranks": 4, "calls": 1 + 2, "bytes": grads}]  # once a step, whatever grad_accum
    assert per_step(cfg("zero"), 10_000_000, 120, None)[1] == {
        "collective": "broadcast", "ranks": 4, "calls": 120, "bytes": grads}  # each parameter from its owner
    # 4 micro-batches of 64 samples, each sending 4 KiB a sample forward and its gradient back
    assert per_step(cfg("pipeline", microbatches=4), 10_000_000, 120, 4096.0) == [
        {"collective": "p2p", "ranks": 2, "calls": 8, "bytes": 8 * 16 * 4096.0}]
    two_d = {**cfg("pipeline", microbatches=4), "parallel": {"dp": 2, "tp": 1, "pp": 2}}  # 2 replicas of 2 stages
    looped = cfg("pipeline", microbatches=4, stages_per_rank=2)  # 2 stages on each rank: twice the sends
    assert per_step(looped, 10_000_000, 120, 4096.0)[0]["calls"] == 16
    assert per_step(two_d, 10_000_000, 120, 4096.0) == [
        {"collective": "p2p", "ranks": 2, "calls": 8, "bytes": 8 * 8 * 4096.0},
        {"collective": "all_reduce", "ranks": 2, "calls": 1, "bytes": grads / 2}]  # a stage's, once a step


def test_fsdp_collectives_are_traced_as_they_run(tmp_path):
    from bench.plan.collectives import model_sizes

    cfg = prepare(compose_plain("strategy=fsdp", "launch.nproc=2", "model=gpt", "force=true",
                                f"results_dir={tmp_path}"))
    weights = 4.0 * model_sizes(cfg["model"])["params"]
    traced = {c["collective"]: c for c in predicted_memory_mb(cfg)["collectives"]}
    # every unit gathered in forward and again in backward (reshard_after_forward), its gradients reduce-scattered
    assert traced["all_gather"]["bytes"] == pytest.approx(2 * weights) and traced["all_gather"]["ranks"] == 2
    assert traced["reduce_scatter"]["bytes"] == pytest.approx(weights)
    assert traced["all_gather"]["calls"] == 2 * traced["reduce_scatter"]["calls"]


def test_the_step_is_compute_plus_bubble_plus_exposed_communication():
    from bench.plan.network import Link, Network
    from bench.plan.steptime import predict_step_ms

    net = Network("t", "by hand", 8, intra={"*": {2: Link(0, 1)}})  # 1 GB/s, no latency
    pipeline = {"strategy": {"name": "pipeline", "microbatches": 4}, "parallel": {"dp": 1, "tp": 1, "pp": 2},
                "global_batch": 8}
    sends = [{"collective": "p2p", "ranks": 2, "calls": 8, "bytes": 8e6}]  # 8 ms of sends
    # 8 samples x 25 GFLOP / 2 stages at 1 TFLOP/s = 100 ms; 4 micro-batches + 1 slot of bubble: 25 ms more
    time = predict_step_ms(pipeline, 25e9, 1.0, sends, net, overlap=0.5)
    assert time["compute_ms"] == pytest.approx(100) and time["bubble_ms"] == pytest.approx(25)
    assert time["comm_exposed_ms"] == pytest.approx(8 * 5 / 4), "sends wait in every slot; overlap is data-parallel's"
    assert time["step_ms"] == pytest.approx(100 + 25 + 10)
    ddp = {"strategy": {"name": "ddp"}, "parallel": {"dp": 2, "tp": 1, "pp": 1}, "global_batch": 8}
    grads = [{"collective": "all_reduce", "ranks": 2, "calls": 1, "bytes": 8e6}]  # 2(2-1)/2 x 8 MB: 8 ms
    time = predict_step_ms(ddp, 25e9, 1.0, grads, net, overlap=0.5)
    assert time["comm_ms"] == pytest.approx(8) and time["step_ms"] == pytest.approx(100 + 4)
    two_d = {**pipeline, "parallel": {"dp": 2, "tp": 1, "pp": 2}, "global_batch": 16}
    time = predict_step_ms(two_d, 25e9, 1.0, sends + grads, net, overlap=0.5)
    assert time["comm_exposed_ms"] == pytest.approx(8 * 5 / 4 + 8), "the replicas' all-reduce once, after the schedule"


def test_without_measured_collectives_memory_is_planned_and_the_search_refused(tmp_path):
    proc = run_bench("plan.network=measured", "plan.activation_checkpointing=[false]", module="bench.plan",
                     results_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "step time not predicted: plan.network: expected `python -m bench.comm` results for " in \
        " ".join(proc.stdout.split())
    proc = run_bench("plan.network=measured", module="bench.search", results_dir=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("bench.search: invalid config: plan.network: expected `python -m bench.comm` results")
    assert "plan.network=h100-nvlink-ib400" in line


# ----------------------------------------------------------------------------- bench.search


def test_the_frontier_doubles_then_bisects_to_the_largest_batch_that_fits():
    from bench.search.frontier import find_frontier

    tried = []

    def fits_below_300(batch):  # a rank that runs out of memory past 300 samples
        tried.append(batch)
        return batch <= 300

    found = find_frontier(fits_below_300, start=64, unit=4, max_batch=4096, max_probes=20)
    assert tried[:4] == [64, 128, 256, 512], "double from the prediction until one runs out"
    assert found["fits"] == 300 and found["oom"] == 304 and len(tried) == len(found["probes"])
    found = find_frontier(fits_below_300, start=1000, unit=4, max_batch=4096, max_probes=20)
    assert [b for b, _ in found["probes"][:3]] == [1000, 500, 248], "halve until one fits, then bisect"
    assert found["fits"] == 300
    assert len(find_frontier(fits_below_300, 64, 4, 4096, max_probes=3)["probes"]) == 3, "a budget of real runs"
    assert find_frontier(lambda b: None, 64, 4, 4096, 9)["probes"] == [(64, None)], "a failed run stops it"


@pytest.mark.slow
def test_bench_search_runs_the_best_layouts_finds_the_frontier_and_resumes(tmp_path, measured_collectives):
    """From a fresh results folder, as a user: the collectives measured, then the search over 2 ranks."""
    shutil.copy(measured_collectives / "comm.jsonl", tmp_path)
    # 0.1 GB a rank: the GPT's frontier lies near 70 samples a replica, where a probe takes seconds
    search = ["model=gpt", "global_batch=32", "plan.world_sizes=[2]", "plan.strategies=[ddp,fsdp]",
              "plan.activation_checkpointing=[false]", "plan.device_tflops=0.02", "plan.device_memory_gb=0.1",
              "search.top_k=1", "search.max_probes=2", "search.steps=3", "search.warmup=1"]
    proc = run_bench(*search, module="bench.search", results_dir=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "search"
    runs = pd_csv(folder / "search.csv")
    top = runs[runs["kind"] == "top"].iloc[0]
    assert top["status"] == "ok" and top["predicted_step_ms"] > 0 and top["measured_step_ms"] > 0
    assert abs(top["peak_mb_error_pct"]) < 10, "the memory prediction holds for the run it picked"
    rows = read_rows(folder / "runs.jsonl")
    assert rows[0]["predicted_step_time_ms"] == pytest.approx(top["predicted_step_ms"], rel=1e-3), "in the row"
    probes = runs[runs["kind"] == "frontier"]
    assert len(probes) == 2 and set(probes["status"]) <= {"ok", "oom"}
    (frontier,) = pd_csv(folder / "frontier.csv").to_dict("records")
    if "oom" in set(probes["status"]):  # an oom row is kept, and bounds the frontier
        assert frontier["first_oom_batch_per_replica"] > frontier["measured_max_batch_per_replica"] > 0
    assert (folder / "prediction_error.png").is_file()
    again = run_bench(*search, module="bench.search", results_dir=tmp_path, timeout=300)
    assert again.returncode == 0 and "0 run(s) launched, the rest reused" in again.stdout
    assert len(read_rows(folder / "runs.jsonl")) == len(rows), "no finished run ran again"


def pd_csv(path):
    import pandas as pd

    return pd.read_csv(path)
