"""The planner in-process: memory and step time predicted by the strategies' own hooks, the arithmetic of the
network and of the step, the calibration by measured rows, the frontier's search. Against real runs:
tests/integration/test_plan_runs.py."""

import json
import warnings

import pytest

from bench.models import ModelSizes
from bench.plan.bound import floor_mb
from bench.plan.memory import memory_refusal, predict, predicted_memory_mb
from bench.run import Run, prepare
from bench.strategies import strategy_names, strategy_spec
from conftest import compose_plain


def run_of(*overrides: str, results_dir="results") -> Run:
    """The run `python -m bench <overrides>` would resolve (its memory not checked)."""
    return prepare(compose_plain(*overrides, "force=true", f"results_dir={results_dir}"))


# ----------------------------------------------------------------------------- memory


def test_the_refusal_names_the_prediction_and_what_to_change():
    predicted = {"params": 512.0, "grads": 0.0, "optim": 512.0, "activations": 20480.0, "temp": 0.5, "total": 21504.5}
    assert memory_refusal(predicted, 32768.0, "x") is None
    line = memory_refusal(predicted, 8192.0, "8.0 GB available on this machine / 1 rank(s)")
    assert line == ("memory: expected a run that fits in 8.0 GB per rank (8.0 GB available on this machine / 1 "
                    "rank(s)), got a predicted peak of 21.0 GB on rank 0 (params 0.50, optim 0.50, activations "
                    "20.00 GB). Lower global_batch or the model's sizes, or shard it (`python -m bench.plan` lists "
                    "each strategy's memory per rank), or pass force=true to run anyway.")


def test_a_strategy_that_says_it_is_not_predicted_is_not_and_the_run_says_why(tmp_path):
    """nn.DataParallel over two GPUs gathers every output on device 0: the strategy says its memory is not
    predicted, and a run of it goes on with a warning rather than without a word."""
    from bench.controller import check_memory

    run = run_of("strategy=dataparallel", results_dir=tmp_path).replace(device="cuda", strategy={
        "name": "dataparallel", "devices": 2})
    predicted, why = predict(run)
    assert predicted is None and why.startswith("strategy=dataparallel is not predicted (nn.DataParallel over")
    (warning,) = check_memory(run).warnings
    assert warning.startswith("memory: not checked before the run: strategy=dataparallel is not predicted")


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


@pytest.mark.parametrize("schedule,count", [("interleaved_zb", 4), ("zbv", 4), ("dualpipev", 4)])
def test_the_zero_bubble_orders_are_torchs_own_and_do_every_pass_once(schedule, count):
    from bench.plan.pipeline import torch_orders

    pp = 2
    orders = torch_orders(schedule, pp, count, 2)
    for rank, order in orders.items():
        for stage in range(2):  # each micro-batch's forward, then its backward (whole, or I before W)
            for mb in range(count):
                passes = [work for work, k, m in order if (k, m) == (stage, mb)]
                assert passes in (["F", "B"], ["F", "I", "W"]), (schedule, rank, stage, mb, passes)
    assert any(work == "W" for order in orders.values() for work, _, _ in order), "the backward split"


def test_a_prediction_is_cached_by_what_it_depends_on(tmp_path):
    run = run_of(results_dir=tmp_path)
    first, _ = predicted_memory_mb(run)
    (cached,) = (tmp_path / ".cache" / "memory").glob("*.json")
    assert predicted_memory_mb(run.replace(steps=99))[0] == first, "steps change nothing predicted"
    cached.write_text('{"predicted": {"total": 1.0}}')
    assert predicted_memory_mb(run)[0] == {"total": 1.0}, "read back, not simulated again"
    assert predicted_memory_mb(run.replace(global_batch=32))[0]["total"] < first["total"]


def test_a_deep_model_is_simulated_at_a_few_depths_and_extrapolated_to_its_own(tmp_path):
    """FSDP with activation checkpointing on a GPT of 6 blocks: its peak moves from the loss to the blocks'
    inputs between 2 and 3 blocks, so the first three depths disagree and 3, 4 and 5 are taken. The whole
    model's simulation agrees with the extrapolation, collectives included."""
    run = run_of("strategy=fsdp", "launch.nproc=2", "model=gpt", "model.n_layers=6", "model.d_model=64",
                 "activation_checkpointing=true", "global_batch=8", results_dir=tmp_path)
    whole, _ = predict(run, whole=True)
    extrapolated, _ = predict(run)
    assert "depths" not in whole and extrapolated["depths"] == "3, 4 and 5 of 6 blocks, extrapolated"
    for kind in ("params", "grads", "optim", "activations", "total"):
        assert extrapolated[kind] == pytest.approx(whole[kind], rel=0.01, abs=0.01), kind
    gathered = [{c["collective"]: c for c in m["collectives"]}["all_gather"] for m in (whole, extrapolated)]
    assert gathered[1]["calls"] == pytest.approx(gathered[0]["calls"])
    assert gathered[1]["bytes"] == pytest.approx(gathered[0]["bytes"])


def test_a_rank_is_simulated_with_pythons_cycle_collector_paused(tmp_path, monkeypatch):
    """Where the collector ran during a simulated step, it freed tensors held in reference cycles at a point that
    depended on what the process had run before: a GPT pipeline's peak was 126.99 to 127.74 MB from process to
    process. Paused, the same; on again after."""
    import gc

    from bench.plan import memory

    seen = []
    simulate = memory.simulate_rank
    monkeypatch.setattr(memory, "simulate_rank", lambda run: seen.append(gc.isenabled()) or simulate(run))
    assert predict(run_of("model=gpt", results_dir=tmp_path))[0] is not None
    assert seen == [False] and gc.isenabled()


def test_an_extrapolated_peak_is_the_largest_of_the_steps_moments_extrapolated():
    """By hand: two depths whose peak is a moment growing 2 MB a block, and with another moment (a phase's start)
    growing 3 MB a block: past 8 blocks more that moment holds more, and is the peak (a one-stage GPipe of
    Llama 3 70B: its loss's gradient peaks at 2 to 4 blocks, its first backward's activations at 80)."""
    from bench.plan.depth import extrapolated

    def simulated(peak: float, start: float) -> dict:
        return {"params": 1.0, "activations": peak - 1, "total": peak, "collectives": [],
                "moments": [{"params": 1.0, "activations": start - 1, "total": start},
                            {"params": 1.0, "activations": peak - 1, "total": peak}]}

    shallow, deeper = simulated(20.0, 12.0), simulated(22.0, 15.0)
    assert extrapolated(shallow, deeper, 2.0)["total"] == 24.0, "the peak's own moment, 2 blocks on"
    far = extrapolated(shallow, deeper, 20.0)
    assert (far["total"], far["activations"], far["moments"][0]["total"]) == (72.0, 71.0, 72.0)
    uneven = {**deeper, "moments": deeper["moments"][:1]}  # phases that do not pair: the peak's moment alone
    assert extrapolated(shallow, uneven, 20.0)["total"] == 60.0


def test_a_plans_simulations_share_no_dtensor_plan_naming_a_destroyed_group(tmp_path):
    """DTensor caches sharding plans by meshes that compare equal across process groups: FSDP x TP simulated after
    HSDP x TP (equal tp meshes) reused a plan naming the first simulation's group, and was not predicted."""
    for replicas in (2, 1):
        run = run_of("strategy=fsdp", "launch.nproc=8", "parallel.tp=2", f"parallel.dp_replicate={replicas}",
                     "model=gpt", results_dir=tmp_path)
        assert predict(run)[0] is not None, predict(run)[1]


def test_a_deep_pipelines_peak_is_found_where_its_moment_moves(tmp_path):
    """A GPipe of FSDP stages (2 x 1 x 2, two micro-batches, checkpointing) of a Llama of 24 blocks: at 1 to 3
    blocks a stage its peak is in the last micro-batch's backward, at 12 after the first backward, with every
    gradient of the stage and the other micro-batch in flight. Extrapolating the peak's moment alone predicted
    3.9 % under the whole model's simulation (a Llama 3 70B 8 x 4 x 2: 13 %); every moment extrapolated, it is
    exact, from two depths (a pipeline's moments are its work items'; three depths were taken before, alike)."""
    run = run_of("model=hf", "model.config.num_hidden_layers=24", "model.config.hidden_size=256",
                 "model.config.intermediate_size=512", "model.config.vocab_size=16384", "strategy=pipeline",
                 "launch.nproc=4", "parallel.pp=2", "parallel.dp=2", "strategy.fsdp=true", "strategy.schedule=gpipe",
                 "strategy.microbatches=2", "activation_checkpointing=true", "global_batch=16", results_dir=tmp_path)
    whole, _ = predict(run, whole=True)
    extrapolated, _ = predict(run)
    assert extrapolated["depths"] == "2 and 4 of 24 blocks, extrapolated"
    assert extrapolated["total"] == pytest.approx(whole["total"], rel=0.001)


def test_an_unevenly_cut_pipeline_is_extrapolated_rank_by_rank_to_its_own_stages(tmp_path):
    """8 blocks over 3 stages: 3, 3 and 2. Simulated at 1 and 2 blocks a stage, the first rank is extrapolated to
    3 a stage and the last, where this GPipe peaks (its logits), to 2: as the whole model's simulation. Taken to 3
    on every rank, the last was a block over (16 blocks over 3 stages: +15.6 %)."""
    run = run_of("model=hf", "model.config.num_hidden_layers=8", "strategy=pipeline", "launch.nproc=3", "parallel.pp=3",
                 "strategy.schedule=gpipe", "strategy.microbatches=2", "global_batch=16", results_dir=tmp_path)
    whole, _ = predict(run, whole=True)
    extrapolated, _ = predict(run)
    assert extrapolated["depths"] == "3 and 6 of 8 blocks, extrapolated"
    assert extrapolated["total"] == pytest.approx(whole["total"], rel=0.001)


def test_the_extrapolation_is_affine_in_each_count_and_each_collective():
    from bench.plan.depth import extrapolated

    shallow = {"total": 10.0, "params": 4.0, "method": "simulated",
               "collectives": [{"collective": "all_gather", "ranks": 2, "span": 2, "calls": 4, "bytes": 40.0}]}
    deeper = {"total": 13.0, "params": 5.0, "method": "simulated",
              "collectives": [{"collective": "all_gather", "ranks": 2, "span": 2, "calls": 6, "bytes": 60.0},
                              {"collective": "all_reduce", "ranks": 2, "span": 2, "calls": 1, "bytes": 8.0}]}
    out = extrapolated(shallow, deeper, 10)  # 10 steps of (deeper - shallow) past shallow
    assert (out["total"], out["params"]) == (40.0, 14.0)
    by_kind = {c["collective"]: c for c in out["collectives"]}
    assert (by_kind["all_gather"]["calls"], by_kind["all_gather"]["bytes"]) == (24, 240.0)
    assert (by_kind["all_reduce"]["calls"], by_kind["all_reduce"]["bytes"]) == (10, 80.0), "absent from shallow"


def test_fsdp_collectives_are_traced_as_they_run(tmp_path):
    from bench.models import model_sizes

    run = run_of("strategy=fsdp", "launch.nproc=2", "model=gpt", results_dir=tmp_path)
    weights = 4.0 * model_sizes(run.config["model"]).params
    traced = {c["collective"]: c for c in predicted_memory_mb(run)[0]["collectives"]}
    # every unit gathered in forward and again in backward (reshard_after_forward), its gradients reduce-scattered
    assert traced["all_gather"]["bytes"] == pytest.approx(2 * weights) and traced["all_gather"]["ranks"] == 2
    assert traced["reduce_scatter"]["bytes"] == pytest.approx(weights)
    assert traced["all_gather"]["calls"] == 2 * traced["reduce_scatter"]["calls"]


def test_hsdp_shards_within_a_group_and_all_reduces_across_replicas_that_span_nodes(tmp_path):
    from bench.models import model_sizes
    from bench.plan.network import Link, Network

    run = run_of("strategy=fsdp", "launch.nproc=4", "parallel.dp_replicate=2", "model=gpt", results_dir=tmp_path)
    weights = 4.0 * model_sizes(run.config["model"]).params
    traced = {c["collective"]: c for c in predicted_memory_mb(run)[0]["collectives"]}
    # ranks {0, 1} shard (consecutive: one node of 2); ranks {0, 2} replicate: the group spans ranks 0..2
    assert (traced["all_gather"]["ranks"], traced["all_gather"]["span"]) == (2, 2)
    assert (traced["reduce_scatter"]["ranks"], traced["reduce_scatter"]["span"]) == (2, 2)
    assert (traced["all_reduce"]["ranks"], traced["all_reduce"]["span"]) == (2, 3)
    assert traced["all_reduce"]["bytes"] == pytest.approx(weights / 2), "each replica all-reduces its shard"
    floor, how = floor_mb(run)  # a replica's share of the weights, not the world's
    assert floor["params"] == pytest.approx(weights / 2 / 2**20, rel=0.01) and "over 2 ranks" in how
    assert floor["total"] <= predicted_memory_mb(run)[0]["total"]
    net = Network("t", "by hand", gpus_per_node=2, intra={"*": {2: Link(10, 100)}}, inter={"*": {2: Link(20, 10)}})
    across = net.call_s("all_reduce", 2, 1, 1e9, span=3)
    assert across == pytest.approx(20e-6 + 1e9 / 10e9) and net.call_s("all_reduce", 2, 1, 1e9) < across


def test_the_memory_simulation_silences_fsdps_view_warning_and_nothing_else(tmp_path):
    """FSDP2 warns when a module returns a view; the simulated FSDP x tensor rank raises it on its fake tensors, and
    it opened every plan (and the memory check before a run). The prediction filters it around its simulation
    only: the filter does not outlive it."""
    from bench.plan.setup import prepare_plan
    from bench.plan.table import make_plan

    def view_warnings(simulate) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            simulate()
            warnings.warn("FSDP2-wrapped module (M) returned a view tensor", UserWarning, stacklevel=1)
        return [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]

    small = ("model.layers=1", "plan.activation_checkpointing=[false]")
    planning = prepare_plan(["plan.strategies=[fsdp]", "plan.world_sizes=[4]", *small,  # 4x1x1 and 2x2x1
                             "plan.network=h100-nvlink-ib400", f"results_dir={tmp_path}"])
    assert len(view_warnings(lambda: make_plan(planning))) == 1, "only the one warned after the simulation"
    run = run_of("strategy=fsdp", "launch.nproc=4", "parallel.tp=2", "model.layers=1", "global_batch=32",
                 results_dir=tmp_path)
    assert len(view_warnings(lambda: predicted_memory_mb(run))) == 1


# ----------------------------------------------------------------------------- what each strategy declares


@pytest.mark.parametrize("world", [1, 2, 6, 8])
def test_every_strategys_layouts_fill_the_world(world):
    for name in strategy_names():
        spec = strategy_spec(name)
        for degrees in spec.layouts(world, 4):
            assert degrees.world == world, (name, degrees)
            assert {d for d, n in degrees.as_dict().items() if n > 1} <= spec.degrees, (name, degrees)
    assert all(d.tp <= 4 for d in strategy_spec("fsdp").layouts(8, 4)), "FSDP's tp group within a node"


def test_fsdp_plans_hsdp_sharded_within_a_node_and_replicated_across_nodes():
    from bench.parallel.topology import Degrees

    layouts = strategy_spec("fsdp").layouts(16, 8)
    hsdp = [d for d in layouts if d.dp_replicate > 1]
    assert hsdp == [Degrees(dp=16, dp_replicate=2), Degrees(dp=8, tp=2, dp_replicate=2),
                    Degrees(dp=4, tp=4, dp_replicate=2)]
    assert {d.dp_shard * d.tp for d in hsdp} == {8}, "a replica's shards fill one node"
    assert [d.label for d in hsdp] == ["2*8x1x1", "2*4x2x1", "2*2x4x1"]
    assert not [d for d in strategy_spec("fsdp").layouts(8, 8) if d.dp_replicate > 1], "one node: no replicas"


def test_strategies_count_what_their_simulation_cannot_trace():
    """DDP's bucketed all-reduce, ZeRO's broadcasts, a pipeline's sends: from the model's sizes and the numbers the
    strategy itself uses (bucket cap, parameter tensors, micro-batches)."""
    sizes = ModelSizes(params=10_000_000, param_tensors=120, boundary_bytes_per_sample=4096.0)

    def run(name: str, degrees: dict, **knobs) -> Run:
        base = run_of(f"strategy={name}", "launch.nproc=1" if name == "single" else "launch.nproc=4",
                      "global_batch=64", "grad_accum=2" if name != "pipeline" else "grad_accum=1")
        nproc = degrees["dp"] * degrees["tp"] * degrees["pp"]
        return base.replace(parallel=degrees, strategy={**base.config["strategy"], **knobs},
                            launch={**base.config["launch"], "nproc": nproc})

    def counted(r: Run) -> list[dict]:
        return r.strategy.collectives(r, sizes)

    grads = 4.0 * 10_000_000  # 10 M fp32 gradients: a 1 MiB first bucket, then 25 MiB ones
    four = {"dp": 4, "tp": 1, "pp": 1}
    assert counted(run("ddp", four)) == [{"collective": "all_reduce", "ranks": 4, "span": 4, "calls": 1 + 2,
                                                 "bytes": grads}]
    assert counted(run("zero", four))[1] == {"collective": "broadcast", "ranks": 4, "span": 4, "calls": 120,
                                                    "bytes": grads}
    # 4 micro-batches of 64 samples, each sending 4 KiB a sample forward and its gradient back
    assert counted(run("pipeline", {"dp": 1, "tp": 1, "pp": 4}, microbatches=4)) == [
        {"collective": "p2p", "ranks": 2, "span": 2, "calls": 8, "bytes": 8 * 16 * 4096.0}]
    two_d = run("pipeline", {"dp": 2, "tp": 1, "pp": 2}, microbatches=4)  # 2 replicas of 2 stages
    # a stage's two replicas are pp = 2 ranks apart: the all-reduce's group reaches rank 2
    assert counted(two_d) == [{"collective": "p2p", "ranks": 2, "span": 2, "calls": 8, "bytes": 8 * 8 * 4096.0},
                              {"collective": "all_reduce", "ranks": 2, "span": 3, "calls": 1, "bytes": grads / 2}]
    looped = run("pipeline", {"dp": 1, "tp": 1, "pp": 4}, microbatches=4, stages_per_rank=2, schedule="interleaved")
    assert counted(looped)[0]["calls"] == 16, "2 stages on each rank: twice the sends"
    assert counted(run("fsdp", four)) == [], "FSDP's collectives are traced by its simulation"
    # Megatron's 3-D: 2 replicas of 2 stages of 2 tensor-parallel ranks, each rank all-reducing its own shard
    three_d = run("pipeline", {"dp": 2, "tp": 2, "pp": 2}, microbatches=4)
    assert counted(three_d)[1] == {"collective": "all_reduce", "ranks": 2, "span": 5, "calls": 1, "bytes": grads / 4}
    sharded = run("pipeline", {"dp": 2, "tp": 2, "pp": 2}, microbatches=4, fsdp=True)
    assert [c["collective"] for c in counted(sharded)] == ["p2p"], "FSDP's, traced by the stages' simulation"
    sized = run("pipeline", {"dp": 2, "tp": 1, "pp": 2}, microbatch_size=8)  # 32 samples a replica, 4 micro-batches
    assert counted(sized)[0]["calls"] == 8 and sized.strategy.batch_unit(sized) == 8


def test_pipeline_layouts_by_hand():
    """Every pipeline of a world of 8: tp within the node, pp >= 2, or one stage of tensor x data parallelism; no
    pure tensor parallelism (strategy=tensor's). Replicas all-reduced or FSDP-sharded; over 2 nodes of 8, HSDP
    where a node holds whole replicas' stages."""
    from bench.parallel.topology import Degrees

    spec = strategy_spec("pipeline")
    assert [d.label for d in spec.layouts(8, None)] == ["1x1x8", "2x1x4", "4x1x2", "1x2x4", "2x2x2", "4x2x1",
                                                         "1x4x2", "2x4x1"]
    assert [d.label for d in spec.layouts(8, 2)] == ["1x1x8", "2x1x4", "4x1x2", "1x2x4", "2x2x2", "4x2x1"]
    hsdp = [d for d in spec.layouts(16, 8) if d.dp_replicate > 1]
    assert {d.dp_shard * d.tp * d.pp for d in hsdp} == {8}, "each replica's shards and stages fill one node"
    assert len(hsdp) == 5 and Degrees(dp=4, tp=2, pp=2, dp_replicate=2) in hsdp
    assert spec.variants(Degrees(pp=8)) == [{}]
    assert spec.variants(Degrees(dp=2, tp=2, pp=2)) == [{"fsdp": False}, {"fsdp": True}]
    assert spec.variants(Degrees(dp=4, tp=2, pp=2, dp_replicate=2)) == [{"fsdp": True}]


def test_the_plan_lists_each_variant_of_a_layout_as_the_run_that_would_make_it():
    from bench.plan.layouts import candidates
    from bench.plan.setup import prepare_plan
    from bench.search.__main__ import run_overrides

    planning = prepare_plan(["model=gpt", "model.n_layers=8", "global_batch=16", "plan.world_sizes=[8]",
                             "plan.strategies=[pipeline]", "plan.activation_checkpointing=[false]",
                             "strategy=pipeline", "strategy.microbatch_size=2"])
    found = {c.layout.label: c for c in candidates(planning.base, planning.plan, planning.knobs)}
    assert len(found) == 8 + 5, "each of the 5 layouts with replicas twice: all-reduced and sharded"
    three_d = found["2x2x2 fsdp=true"].run
    assert three_d.config["strategy"]["fsdp"] and three_d.config["strategy"]["microbatch_size"] == 2
    assert "strategy.fsdp=true" in run_overrides(three_d) and "strategy.microbatch_size=2" in run_overrides(three_d)
    assert found["1x1x8"].refusal is None and found["2x1x4 fsdp=false"].run.config["strategy"]["fsdp"] is False


def test_a_layout_slower_than_its_strategys_shown_ones_is_not_simulated(tmp_path):
    """A layout whose step without its traced collectives is slower than the plan.shown_per_strategy fastest of
    its strategy that fit cannot be shown: it is listed "slower", unsimulated; the fastest are the same."""
    from bench.plan.setup import prepare_plan
    from bench.plan.table import make_plan

    planning = prepare_plan(["model=gpt", "model.n_layers=4", "global_batch=16", "plan.world_sizes=[4]",
                             "plan.strategies=[pipeline]", "plan.activation_checkpointing=[false]",
                             "plan.network=h100-nvlink-ib400", "plan.device_tflops=10", "plan.shown_per_strategy=1",
                             f"results_dir={tmp_path}"])
    pruned, whole = make_plan(planning), make_plan(planning, prune=False)
    assert [p.status for p in whole].count("slower") == 0 and [p.status for p in pruned].count("slower") >= 1
    assert (pruned[0].layout, pruned[0].predicted_step_ms) == (whole[0].layout, whole[0].predicted_step_ms)
    slower = [p for p in pruned if p.status == "slower"]
    assert all(p.memory is None and p.note.startswith("not simulated: at least") for p in slower)
    exact = {p.layout: p.predicted_step_ms for p in whole}
    assert all(exact[p.layout] > pruned[0].predicted_step_ms for p in slower)
    # the floor that turns layouts away unsimulated is below every simulated peak (tensor x FSDP x pipeline here)
    assert all(floor_mb(p.run)[0]["total"] <= p.memory["total"] for p in whole if p.memory)


def test_a_layout_too_big_at_its_floor_or_shallowest_simulation_is_not_simulated_further(tmp_path):
    """A layout whose floor (weights, and what one block saves for backward times its blocks) exceeds the device
    is not simulated at all. Each block more holds more: a deep model's layout whose first simulated depth exceeds
    the device cannot fit, and its deeper simulations are skipped; where it fits, the prediction reads that depth
    from the cache, and its floor is below it."""
    from bench.plan.setup import prepare_plan
    from bench.plan.table import make_plan

    # 64 samples of a large vocabulary, checkpointed: the floor (`floor_mb`) is 98 MB, 2 blocks' peak 106 MB, 8
    # blocks' 116
    common = ["model=gpt", "model.n_layers=8", "model.vocab_size=4096", "global_batch=64", "plan.world_sizes=[2]",
              "plan.strategies=[fsdp]", "plan.activation_checkpointing=[true]", f"results_dir={tmp_path}"]
    # not checkpointed, the floor alone is 203 MB: what each of 8 blocks saves for backward, counted on one
    (line,) = make_plan(prepare_plan([*common, "plan.activation_checkpointing=[false]", "plan.device_memory_gb=0.1"]))
    assert line.status == "does not fit" and line.note.startswith("not simulated: at least 203 MB")
    assert not (tmp_path / ".cache" / "simulations").exists(), "nothing simulated"
    (line,) = make_plan(prepare_plan([*common, "plan.device_memory_gb=0.1"]))
    assert line.status == "does not fit" and line.note.startswith("simulated at 2 of 8 blocks only: already")
    assert not (tmp_path / ".cache" / "memory").exists(), "no prediction simulated"
    (line,) = make_plan(prepare_plan([*common, "plan.device_memory_gb=1"]))
    assert line.status == "fits" and line.memory["depths"].endswith("of 8 blocks, extrapolated")
    assert floor_mb(line.run)[0]["total"] <= line.memory["total"]
    simulated = int(line.memory["depths"].split(" and ")[1].split()[0]) - 1  # depths 2 to the deepest, one apart
    assert len(list((tmp_path / ".cache" / "simulations").iterdir())) == simulated, "each depth simulated once"


def test_a_3d_stage_is_simulated_with_its_tensor_parallel_and_fsdp_collectives(tmp_path):
    """Each stage of 2 x 2 x 2 tensor-parallel over ranks 0-1 and FSDP-sharded over replicas pp x tp = 4 ranks
    apart: its per-layer all-reduces and its gather-once, reduce-once FSDP traced."""
    run = run_of("strategy=pipeline", "model=gpt", "launch.nproc=8", "parallel.dp=2", "parallel.tp=2",
                 "parallel.pp=2", "strategy.fsdp=true", "global_batch=16", results_dir=tmp_path)
    predicted, why = predict(run)
    traced = {(c["collective"], c["ranks"], c["span"]): c["calls"] for c in predicted["collectives"]}
    assert traced[("all_gather", 2, 5)] == traced[("reduce_scatter", 2, 5)] == 2, "a block and the stage, once"
    assert traced[("all_reduce", 2, 2)] > 0, "tensor parallelism's, within the stage"
    unsharded, _ = predict(run.replace(strategy={**run.config["strategy"], "fsdp": False}))
    assert {c["collective"] for c in unsharded["collectives"]} == {"all_reduce"}
    assert unsharded["optim"] == pytest.approx(2 * predicted["optim"], rel=0.05), "the optimizer state sharded"


def test_many_micro_batches_are_simulated_at_a_few_and_extrapolated(tmp_path):
    from bench.plan.pipeline import by_microbatches, simulate_pipeline

    run = run_of("strategy=pipeline", "model=gpt", "launch.nproc=2", "strategy.microbatches=16", "global_batch=32",
                 results_dir=tmp_path)
    extrapolated = by_microbatches(run)
    assert extrapolated["counts"] == "2, 3, 4 of 16 micro-batches, extrapolated"
    assert extrapolated["total"] == pytest.approx(simulate_pipeline(run)["total"], rel=0.01)


def test_the_step_is_compute_plus_bubble_plus_exposed_communication():
    from bench.plan.formula import predict_step_ms
    from bench.plan.network import Link, Network

    net = Network("t", "by hand", 8, intra={"*": {2: Link(0, 1)}})  # 1 GB/s, no latency
    pipeline = run_of("strategy=pipeline", "launch.nproc=2", "global_batch=8")  # 4 micro-batches over 2 stages
    sends = [{"collective": "p2p", "ranks": 2, "calls": 8, "bytes": 8e6}]  # 8 ms of sends
    # 8 samples x 25 GFLOP / 2 stages at 1 TFLOP/s = 100 ms; 4 micro-batches + 1 slot of bubble: 25 ms more
    time = predict_step_ms(pipeline, 25e9, 1.0, sends, net, overlap=0.5)
    assert time["compute_ms"] == pytest.approx(100) and time["bubble_ms"] == pytest.approx(25)
    assert time["comm_exposed_ms"] == pytest.approx(8 * 5 / 4), "sends wait in every slot; overlap is data-parallel's"
    assert time["step_ms"] == pytest.approx(100 + 25 + 10)
    ddp = run_of("strategy=ddp", "launch.nproc=2", "global_batch=8")
    grads = [{"collective": "all_reduce", "ranks": 2, "calls": 1, "bytes": 8e6}]  # 2(2-1)/2 x 8 MB: 8 ms
    time = predict_step_ms(ddp, 25e9, 1.0, grads, net, overlap=0.5)
    assert time["comm_ms"] == pytest.approx(8) and time["step_ms"] == pytest.approx(100 + 4)
    two_d = run_of("strategy=pipeline", "launch.nproc=4", "parallel.dp=2", "global_batch=16")
    time = predict_step_ms(two_d, 25e9, 1.0, sends + grads, net, overlap=0.5)
    assert time["comm_exposed_ms"] == pytest.approx(8 * 5 / 4 + 8), "the replicas' all-reduce once, after the schedule"
    # expert parallelism: the all-to-alls on the critical path (no overlap), as long as the busiest rank's tokens
    exchange = [{"collective": "all_to_all", "ranks": 2, "calls": 1, "bytes": 16e6}]  # (2-1)/2 x 16 MB: 8 ms
    experts = run_of("strategy=fsdp", "model=gpt", "model.experts=4", "launch.nproc=2", "parallel.ep=2",
                     "global_batch=8")
    time = predict_step_ms(experts, 25e9, 1.0, grads + exchange, net, overlap=0.5, expert_load=1.5)
    assert time["comm_ms"] == pytest.approx(8 + 12) and time["comm_exposed_ms"] == pytest.approx(4 + 12)
    # and the busiest rank's experts compute 1.5 x the mean: 10 of the 25 GFLOP a sample, 5 more
    time = predict_step_ms(experts, 25e9, 1.0, grads + exchange, net, overlap=0.5, expert_load=1.5,
                           expert_flops_per_sample=10e9)
    assert time["compute_ms"] == pytest.approx(100 * 30 / 25)
    ring = run_of("strategy=fsdp", "model=gpt", "launch.nproc=2", "parallel.cp=2", "strategy.cp_method=ring",
                  "global_batch=8")
    time = predict_step_ms(ring, 25e9, 1.0, grads + exchange, net, overlap=0.5, expert_load=1.5)
    assert time["comm_ms"] == pytest.approx(8 + 8), "a ring's passes are all-to-alls of no router"
    time = predict_step_ms(ring, 25e9, 1.0, grads, net, overlap=0.5, expert_load=1.5, expert_flops_per_sample=10e9)
    assert time["compute_ms"] == pytest.approx(100), "without expert parallelism every rank computes its own tokens"


def test_a_strategy_is_calibrated_by_its_own_runs_else_by_other_models_measured_runs(tmp_path):
    """Rows as `python -m bench` writes them (the configs it runs, the fields the plan reads): the MLP's single
    and DDP runs, the GPT's single run. The GPT's DDP has no run of its own at another world size, so the MLP's
    DDP run calibrates it by its measured - predicted per block and core; with the GPT's own DDP run at 4
    ranks, that one does, by its measured / predicted."""
    from bench.models import count_blocks
    from bench.plan.calibration import StepTimeModel
    from bench.plan.setup import prepare_plan
    from bench.plan.throughput import core_share, machine_cores

    common = ["global_batch=16", "launch.omp_num_threads=1", f"results_dir={tmp_path}"]
    planning = prepare_plan(["model=gpt", "plan.network=h100-nvlink-ib400", *common])
    model = StepTimeModel(planning.base, planning.plan, planning.network, planning.device_name, None)

    def row(*overrides: str, step_ms: float | None = None, factor: float = 1.0, plus_ms: float = 0.0) -> dict:
        run = run_of(*overrides, *common)
        if step_ms is None:  # what the model predicts of this run from the rows written so far, x factor + ms
            time, _, source = model.predict(run, predicted_memory_mb(run)[0])
            assert source.startswith("measured"), source
            step_ms = factor * time["step_ms"] + plus_ms
        return {"status": "ok", "device_name": planning.device_name, "config": run.config,
                "model": run.config["model"]["name"], "world_size": run.world_size, "global_batch": 16,
                "omp_num_threads": machine_cores(), "hardware_flops_per_step": 1e9, "step_time_ms_p50": step_ms}

    def append(*rows: dict) -> None:
        with (tmp_path / "runs.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    append(row("model=mlp", step_ms=100.0), row("model=gpt", step_ms=200.0))
    mlp_ddp = row("model=mlp", "strategy=ddp", "launch.nproc=2", plus_ms=30.0)
    append(mlp_ddp)
    gpt_ddp = run_of("model=gpt", "strategy=ddp", "launch.nproc=2", *common)
    expected = (30.0 * core_share(mlp_ddp["config"]) / count_blocks(mlp_ddp["config"]["model"])
                * count_blocks(gpt_ddp.config["model"]) / core_share(gpt_ddp.config))
    factor, ms, source = model.overhead(gpt_ddp)
    assert factor == 1 and ms == pytest.approx(expected)
    assert source == f"{ms:+.1f} ms: ddp's measured - predicted per block and core of mlp at 2 rank(s) (1 run(s))"
    append(row("model=gpt", "strategy=ddp", "launch.nproc=4", factor=0.8))
    factor, ms, source = model.overhead(gpt_ddp)
    assert factor == pytest.approx(0.8) and ms == 0 and source.endswith("gpt at 4 rank(s) (1 run(s))")


def test_the_plan_reads_the_rows_of_single_runs_and_of_sweeps(tmp_path):
    """`python -m bench` appends a run's row to <results_dir>/runs.jsonl, a sweep's (`-m`) to
    <results_dir>/sweeps/<sweep>/runs.jsonl: the plan and its check read both."""
    from bench.plan.throughput import measured_runs

    run = run_of(results_dir=tmp_path)
    sweep = tmp_path / "sweeps" / "2024-01-01_00-00-00-000000"
    sweep.mkdir(parents=True)
    for folder, step_ms in ((tmp_path, 100.0), (sweep, 200.0)):
        row = {"status": "ok", "device_name": "the device", "config": run.config, "step_time_ms_p50": step_ms}
        (folder / "runs.jsonl").write_text(json.dumps(row) + "\n")
    found = measured_runs(tmp_path, run.config, "the device", ())
    assert sorted(row["step_time_ms_p50"] for row in found) == [100.0, 200.0]


def test_without_a_measured_throughput_the_plan_gives_the_command_that_measures_this_model(tmp_path):
    """The command keeps the plan's model option and the overrides that shape its step, not those of the layouts
    or of the planner; a layout with activation checkpointing names the run it needs, which has it too."""
    from bench.plan.setup import prepare_plan
    from bench.plan.throughput import rank_tflops

    planning = prepare_plan(["model=gpt-125m", "model.n_layers=2", "optim.name=adamw", "launch.nproc=2",
                             "plan.world_sizes=[2]", "global_batch=16", "device=cpu", f"results_dir={tmp_path}"])
    assert planning.single_run == ("model=gpt-125m", "model.n_layers=2", "optim.name=adamw", "global_batch=16",
                                   "device=cpu", f"results_dir={tmp_path}")
    command = f"python -m bench strategy=single {' '.join(planning.single_run)}"
    run = run_of("model=gpt-125m", "model.n_layers=2", "strategy=ddp", "launch.nproc=2", results_dir=tmp_path)
    assert rank_tflops(run, planning.plan, None, None, planning.single_run) == (None, (
        f"no throughput: no strategy=single run of this model measured here: run `{command}` once, or set "
        "plan.device_tflops"))
    assert rank_tflops(run.replace(activation_checkpointing=True), planning.plan, None, None,
                       planning.single_run) == (None, (
        "no throughput: no strategy=single run of this model with activation_checkpointing=true measured here: "
        f"run `{command} activation_checkpointing=true` once, or set plan.device_tflops"))


def test_the_check_says_when_nothing_was_predicted_rather_than_nan():
    """Without measured collectives no step time is predicted: the check's errors say so, never `nan%`."""
    import pandas as pd

    from bench.plan.check import error_summary, markdown

    table = pd.DataFrame([{
        "model": "mlp", "world_size": 2, "strategy": "ddp", "layout": "2x1x1", "activation_checkpointing": False,
        "grad_accum": 1, "runs": 1, "measured_step_ms": 100.0, "predicted_step_ms": None, "calibrated_step_ms": None,
        "calibrated_by": "nothing measured to calibrate by", "measured_peak_mb": 50.0, "predicted_peak_mb": 55.0,
        "step_error_pct": float("nan"), "calibrated_error_pct": float("nan"), "memory_error_pct": 10.0}])
    text = markdown(table)
    assert "nan" not in text.lower()
    assert "| 100.0 | – | – | – | – | nothing measured to calibrate by | 50.0 | 55.0 | +10.0% |" in text
    assert text.endswith("1 layouts: step time a priori – (no predictions to compare), calibrated – (no predictions "
                         "to compare), memory |error| mean 10.0%, max 10.0%\n")
    assert error_summary(pd.Series([-10.0, float("nan")])) == "|error| mean 10.0%, max 10.0% (1 not predicted)"


# ----------------------------------------------------------------------------- the commands, in-process


def test_bench_plan_refuses_what_it_cannot_plan_in_one_line(tmp_path, capsys):
    from bench.plan.__main__ import main

    assert main(["plan.strategies=[nope]", f"results_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"bench.plan: invalid config: plan.strategies: expected some of {', '.join(strategy_names())}, got "
        "['nope']. Change `plan.strategies=` on the command line."]
    assert main(["plan.workers=0", f"results_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "bench.plan: invalid config: plan.workers: expected a number of processes (1: every simulation in this one) "
        "or null (this machine's cores), got 0. Change `plan.workers=` on the command line."]


def test_a_strategys_knobs_are_planned_as_variants_where_the_plan_lists_them(tmp_path, capsys):
    """`plan.variants` plans each of a strategy's layouts with each knob set more: a pipeline's schedules beside
    its own all-reduced and FSDP variants. A knob the strategy does not have is refused in one line."""
    from bench.plan.__main__ import main
    from bench.plan.layouts import candidates
    from bench.plan.setup import prepare_plan

    common = ["model=gpt", "plan.world_sizes=[4]", "plan.strategies=[pipeline]",
              "plan.activation_checkpointing=[false]", f"results_dir={tmp_path}"]
    planning = prepare_plan(common)
    plain = candidates(planning.base, planning.plan, planning.knobs)
    planning = prepare_plan([*common, "plan.variants={pipeline:[{schedule:1f1b},{schedule:zbv,stages_per_rank:2}]}"])
    varied = candidates(planning.base, planning.plan, planning.knobs)
    assert len(varied) == 2 * len(plain)
    zbv = [c for c in varied if dict(c.layout.knobs).get("schedule") == "zbv" and c.run]
    assert zbv and all(c.run.config["strategy"]["stages_per_rank"] == 2 for c in zbv)
    assert "schedule=zbv stages_per_rank=2" in zbv[0].layout.label
    assert main([*common, "plan.variants={pipeline:[{shedule:1f1b}]}"]) == 2
    assert "plan.variants: expected {strategy: [{its knob: value, ...}, ...]}" in capsys.readouterr().err


def test_without_measured_collectives_memory_is_planned_and_the_search_refused(tmp_path, capsys):
    from bench.plan.__main__ import main as plan
    from bench.search.__main__ import main as search

    assert plan(["plan.network=measured", "plan.activation_checkpointing=[false]", f"results_dir={tmp_path}"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "step time not predicted: plan.network: expected `python -m bench.comm` results for " in out
    assert search(["plan.network=measured", f"results_dir={tmp_path}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bench.search: invalid config: plan.network: expected `python -m bench.comm` results")
    assert "plan.network=h100-nvlink-ib400" in line


def test_the_printed_plan_keeps_each_world_sizes_first_layouts_of_each_strategy():
    import pandas as pd

    from bench.plan.__main__ import shown

    table = pd.DataFrame({"world_size": [8, 8, 8, 8, 64, 64], "strategy": ["fsdp", "fsdp", "pipeline", "fsdp",
                                                                        "fsdp", "fsdp"], "layout": list("abcdef")})
    assert shown(table, 2)["layout"].tolist() == ["a", "b", "c", "e", "f"], "in the plan's order"
    assert len(shown(table, None)) == 6


@pytest.mark.parametrize("command", ["bench.plan", "bench.plan.check", "bench.search"])
def test_the_planners_commands_say_how_they_are_used(command, capsys):
    import importlib

    module = importlib.import_module(command if command == "bench.plan.check" else f"{command}.__main__")
    assert module.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {command} ")


# ----------------------------------------------------------------------------- the network, the search


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


def test_a_custom_models_tensor_parallel_memory_is_predicted(tmp_path):
    """custom's tp_plan reads its module names off a meta-device build of the user's module, asked for inside the
    simulation's fake mode (here for a derived run, whose module the checks never built): a prediction, not
    `memory not predicted: TypeError on fake tensors`, with rank 0 holding half of each column-wise and row-wise
    layer and every other parameter whole."""
    import yournet

    checked = run_of("model=custom", "model.module._target_=yournet.build", "model.inputs.vocab_size=64",
                     "model.inputs.seq_len=16", "strategy=tensor", "launch.nproc=2",
                     "model.tp_plan={layers.*.up:colwise,layers.*.down:rowwise}", results_dir=tmp_path)
    run = checked.replace(model={**checked.config["model"], "module": {"_target_": "yournet.build", "depth": 3}})
    predicted, why = predict(run)
    assert why == "" and predicted is not None
    whole = yournet.build(depth=3)
    split = [p for layer in whole.layers for p in (layer.up.weight, layer.up.bias, layer.down.weight)]
    rank0 = sum(p.numel() for p in whole.parameters()) - sum(p.numel() for p in split) // 2
    assert predicted["params"] * 2**20 == 4 * rank0, "fp32 weights"


def test_a_pipeline_ranks_floor_holds_the_micro_batches_its_schedule_keeps_in_flight(tmp_path):
    """The floor's count of micro-batches in flight, by hand: GPipe's first rank holds all 8 before its first
    backward, and 7 with the gradients after it; 1F1B's holds pp = 4 (its warm-up, then one more), and 4 again
    with the gradients (a forward follows each backward), its last rank one at a time, with the model's outputs;
    zbv's first rank holds both its stages' (the V's first and last), torch's own order."""
    from bench.plan.pipeline import microbatches_held

    def most(schedule: str, rank: int, *more: str) -> tuple[int, int, int]:
        run = run_of("strategy=pipeline", "model=gpt", "model.n_layers=8", "launch.nproc=4", "parallel.pp=4",
                     f"strategy.schedule={schedule}", "strategy.microbatches=8", "global_batch=16", *more,
                     results_dir=tmp_path)
        moments = microbatches_held(run, rank)
        return (max(held for held, _, _ in moments), max(last for _, last, _ in moments),
                max(held for held, _, gradients in moments if gradients == 1.0))

    assert most("gpipe", 0) == (8, 0, 7) and most("gpipe", 3) == (8, 8, 7)
    assert most("1f1b", 0) == (4, 0, 4) and most("1f1b", 3) == (1, 1, 1)
    assert most("zbv", 0, "strategy.stages_per_rank=2")[:2] == (8, 1), "7 warm-up forwards, then the V's last's"


def test_a_pipeline_floor_puts_the_stage_ends_on_the_ranks_that_hold_them(tmp_path):
    """The embedding is on the first rank; the head on the last rank of a looped schedule, and on the first of a
    V-shaped one (zbv: rank 0 holds stages 0 and 3)."""
    from bench.measure.memory import held_between_steps_mb
    from bench.models import meta_instance
    from bench.plan.bound import shares

    def ends(schedule: str, per_rank: int) -> dict:
        run = run_of("strategy=pipeline", "model=gpt", "model.n_layers=8", "launch.nproc=2", "parallel.pp=2",
                     f"strategy.schedule={schedule}", f"strategy.stages_per_rank={per_rank}", "global_batch=8",
                     results_dir=tmp_path)
        held = held_between_steps_mb(meta_instance(run.config["model"]), run.config["optim"])
        shares(run, held)
        return held["ends"]

    looped, v_shaped = ends("1f1b", 1), ends("zbv", 2)
    assert sorted(looped) == [0, 1] and sorted(v_shaped) == [0]
    assert v_shaped[0]["params"] == pytest.approx(looped[0]["params"] + looped[1]["params"])


def test_one_blocks_activations_are_counted_on_one_tensor_parallel_rank(tmp_path):
    """The floor's activations as one of tp ranks holds them, its layers split by the model's own plan: a tiny
    Llama's logits are gathered for its loss (whole on every rank, as are its blocks' outputs), its attention and
    MLP's inner activations split; a view of a weight is no activation at any batch (counted by shape, a weight's
    shard read as an activation at one sample and not at two)."""
    from bench.plan.activations import one_block_bytes

    def counted(tp: int, samples: int) -> tuple[float, float, float]:
        run = run_of("strategy=fsdp", "model=hf", f"launch.nproc={2 * tp}", f"parallel.tp={tp}", "global_batch=4",
                     results_dir=tmp_path)
        return one_block_bytes(run, samples)

    (whole, out, logits), (split, split_out, split_logits) = counted(1, 1), counted(2, 1)
    assert split_logits == logits and split_out == out, "gathered, and replicated: whole on each rank"
    assert whole / 2 < split < whole, "the inner activations split, the norms' inputs whole"
    one, two, three = (counted(2, n)[0] for n in (1, 2, 3))
    assert three - two == two - one > 0, "affine in the samples, as the floor extrapolates it"


def test_the_plan_is_the_same_with_its_simulations_ahead_in_worker_processes(tmp_path, monkeypatch):
    """Once a plan has simulated for a while (WORKERS_AFTER_S, none here), worker processes simulate the layouts
    it will ask next: the plan is the same, layout by layout, and the workers gave it some of its verdicts."""
    from bench.plan import fitting
    from bench.plan.setup import prepare_plan
    from bench.plan.table import make_plan

    monkeypatch.setattr(fitting, "WORKERS_AFTER_S", 0.0)
    from_workers = []
    verdict = fitting.Simulations.verdict

    def spied(self, key, run, device_mb, left):
        from_workers.append(self.handed(key))
        return verdict(self, key, run, device_mb, left)

    monkeypatch.setattr(fitting.Simulations, "verdict", spied)
    common = ["model=gpt", "global_batch=8", "plan.world_sizes=[4]", "plan.strategies=[fsdp]"]

    def plan(workers: int) -> list[tuple]:
        planning = prepare_plan([*common, f"plan.workers={workers}", f"results_dir={tmp_path / str(workers)}"])
        return [(p.layout, p.status, p.note, p.memory and p.memory["total"]) for p in make_plan(planning)]

    here = plan(1)
    assert not any(from_workers)
    assert plan(2) == here and sum(from_workers) >= 2


def test_a_plan_of_many_layouts_of_a_deep_model_starts_its_workers_as_soon_as_they_are_listed(monkeypatch):
    """Each layout of a model simulated at a few depths takes seconds: where they would take WORKERS_AFTER_S, the
    workers start before the first simulation, not once it has run a while."""
    from bench.plan import fitting
    from bench.plan.depth import simulated_at_depths

    started = []
    monkeypatch.setattr(fitting.Simulations, "start", lambda self: started.append(self.workers))
    many = int(fitting.WORKERS_AFTER_S / fitting.DEEP_LAYOUT_S)
    for workers, layouts, deep in ((2, many + 1, True), (2, many, True), (2, 1000, False), (1, 1000, True)):
        fitting.Simulations(workers).expect(layouts, deep)
    assert started == [2]
    assert not simulated_at_depths(compose_plain("model=gpt")["model"]), "2 blocks: simulated whole"
    assert simulated_at_depths(compose_plain("model=gpt", "model.n_layers=8")["model"])


def test_a_16_bit_floor_counts_what_fsdps_mixed_precision_holds(tmp_path):
    """FSDP in bf16 casts each block's inputs to 16 bits, where autocast alone keeps the residual stream fp32: the
    floor counts the smaller of the two, below the simulated peak with checkpointing and without (counted under
    autocast alone it was over both, 7.7 MB against 7.0 and 12.4 against 12.1); and it gathers a stage's weights
    in 16 bits."""
    for checkpointing in ("true", "false"):
        run = run_of("strategy=fsdp", "model=hf", "model.seq_len=256", "model.config.vocab_size=64", "launch.nproc=4",
                     "parallel.tp=2", "precision=bf16", "global_batch=16", f"activation_checkpointing={checkpointing}",
                     results_dir=tmp_path)
        assert floor_mb(run)[0]["total"] <= predict(run)[0]["total"], checkpointing
    # a pipeline of FSDP stages gathers each stage in bf16: counted at 4 bytes a parameter, its floor was 47.0 MB
    # against a simulated 41.2 (a Llama 3 70B 64x4x2's, 102 GB against 95)
    run = run_of("strategy=pipeline", "model=hf", "launch.nproc=4", "parallel.pp=2", "parallel.dp=2",
                 "strategy.fsdp=true", "precision=bf16", "strategy.schedule=gpipe", "strategy.microbatches=2",
                 "model.config.vocab_size=64", "model.config.hidden_size=256", "model.config.intermediate_size=1024",
                 "model.config.num_hidden_layers=8", "model.seq_len=16", "global_batch=8", results_dir=tmp_path)
    assert floor_mb(run)[0]["total"] <= predict(run)[0]["total"]
