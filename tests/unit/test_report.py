"""`bench.report` in-process on fabricated runs.jsonl files (tests/fabricated.py): every number checked against a
hand computation. Its command drawing every figure, and `python -m bench.report`: tests/integration."""

import csv
import html
import json
import statistics
from pathlib import Path

import pandas as pd
import pytest

from bench.report import compare, figure_data, findings, plots
from bench.report.cli import main
from bench.report.load import load_rows, steps_by_configuration
from bench.report.scaling import add_scaling
from bench.report.table import runs_frame, summarize
from fabricated import STEPS, WARMUP, Sweep, scaling_sweep_in, two_sides


@pytest.fixture
def scaling_sweep(tmp_path) -> Path:
    return scaling_sweep_in(tmp_path)


def summary_of(folder: Path):
    rows, _ = load_rows([folder])
    runs = runs_frame(rows)
    return add_scaling(summarize(runs)), runs


def line(summary, strategy, world, batch):
    found = summary[(summary.strategy == strategy) & (summary.world_size == world) & (summary.global_batch == batch)]
    assert len(found) == 1, found
    return found.iloc[0]


def test_repeats_are_pooled_and_non_ok_runs_are_listed_but_not_counted(scaling_sweep):
    summary, runs = summary_of(scaling_sweep)
    assert len(runs) == 13 and len(summary) == 8, "13 runs in 8 configurations (repeats pooled)"
    single = line(summary, "single", 1, 64)
    assert (single.runs, single.ok_runs, single.status) == (3, 3, "ok")
    assert single.samples_per_s == 100 and single.samples_per_s_mean == 100
    assert single.samples_per_s_std == pytest.approx(10.0)  # sample std of 100, 110, 90
    assert single.samples_per_s_mad == 10.0  # median |x - 100| of 0, 10, 10
    assert single.peak_mem_mb == 510
    ddp2 = line(summary, "ddp", 2, 64)
    assert (ddp2.runs, ddp2.ok_runs, ddp2.status) == (4, 3, "ok 3/4, failed 1")
    assert (ddp2.samples_per_s, ddp2.samples_per_s_std) == (170, pytest.approx(10.0)), "the failed repeat adds nothing"
    assert ddp2.error == "rank 1: boom"
    failed = line(summary, "ddp", 4, 64)
    assert failed.status == "failed" and failed.error.startswith("rank 3")
    assert failed.samples_per_s != failed.samples_per_s and failed.speedup != failed.speedup  # NaN
    skipped = line(summary, "single", 2, 64)
    assert skipped.status == "skipped" and skipped.error.startswith("launch.nproc")
    assert skipped.samples_per_s != skipped.samples_per_s


def test_speedup_and_strong_and_weak_efficiency(scaling_sweep):
    summary, _ = summary_of(scaling_sweep)
    ddp2 = line(summary, "ddp", 2, 64)
    assert ddp2.speedup == pytest.approx(170 / 100)
    assert ddp2.efficiency_strong == pytest.approx(170 / (2 * 100))  # 0.85
    assert ddp2.efficiency_weak == pytest.approx(170 / (2 * 90)), "per-rank batch 32: single G=32 is X_1"
    assert ddp2.scaling == "strong, weak"
    assert ddp2.baseline_strong == "single, 1 device, G=64" and ddp2.baseline_weak == "single, 1 device, G=32"
    small = line(summary, "ddp", 2, 32)
    assert small.speedup == pytest.approx(150 / 90) and small.efficiency_strong == pytest.approx(150 / 180)
    assert small.efficiency_weak != small.efficiency_weak and small.scaling == "strong", "no 1-rank G=16 run"
    one_rank = line(summary, "ddp", 1, 64)
    assert one_rank.speedup == pytest.approx(0.95) and one_rank.scaling == "", "DDP's overhead on 1 rank vs single"
    assert line(summary, "single", 1, 64).speedup == 1.0
    # loss: ddp's repeats have offsets 0, 1, 2 (median 1), single's likewise -> same final loss
    assert ddp2.loss_diff_vs_single == pytest.approx(0.0, abs=1e-12)


def test_without_single_the_same_strategy_on_one_rank_is_the_baseline(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("ddp", 1, 16, 50)
    s.add("ddp", 2, 16, 80)
    summary, _ = summary_of(s.folder)
    ddp2 = line(summary, "ddp", 2, 16)
    assert (ddp2.speedup, ddp2.efficiency_strong) == (pytest.approx(1.6), pytest.approx(0.8))
    assert ddp2.baseline_strong == "ddp, 1 device, G=16"


def test_other_machines_and_configs_are_not_pooled(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("single", 1, 64, 100)
    s.add("single", 1, 64, 300, host="otherhost")
    s.add("single", 1, 64, 200, device_name="Other CPU")
    s.add("single", 1, 64, 400, optim={"name": "adamw", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0})
    summary, _ = summary_of(s.folder)
    assert sorted(summary["samples_per_s"]) == [100, 200, 300, 400]
    assert set(summary["variant"]) == {"optim.name=sgd", "optim.name=adamw"}


def test_data_parallel_with_several_devices_per_rank_scales_over_devices(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("single", 1, 64, 100)
    s.add("dataparallel", 1, 64, 150, fields={"devices": 2})
    summary, _ = summary_of(s.folder)
    dp = line(summary, "dataparallel", 1, 64)
    assert (dp.devices, dp.speedup, dp.efficiency_strong) == (2, 1.5, 0.75), "N is 2 devices, not 1 rank"
    assert dp.batch_per_replica == 32


def test_one_replica_with_a_fixed_global_batch_is_strong_scaling_only(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("single", 1, 32, 100)
    s.add("tensor", 2, 32, 120, parallel={"dp": -1, "tp": 2, "pp": 1})  # 1 replica: batch per replica 32
    summary, _ = summary_of(s.folder)
    tensor = line(summary, "tensor", 2, 32)
    assert tensor.batch_per_replica == 32 and tensor.efficiency_strong == pytest.approx(0.6)
    assert pd.isna(tensor.efficiency_weak), "the global batch did not grow: no weak-scaling figure"
    assert tensor.scaling == "strong" and tensor.variant == "", "parallel.* comes with the strategy"


def test_keys_a_strategy_brings_along_are_not_a_variant(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("single", 1, 64, 100)
    s.add("ddp", 2, 64, 150, options={"bucket_cap_mb": 25})
    s.add("ddp", 2, 64, 170, options={"bucket_cap_mb": 100})
    s.add("pipeline", 2, 64, 120, pipeline={"schedule": "gpipe", "microbatches": 4})  # its own section
    summary, _ = summary_of(s.folder)
    assert sorted(summary["variant"]) == ["", "", "strategy.bucket_cap_mb=100", "strategy.bucket_cap_mb=25"]
    assert sorted(summary["speedup"]) == [1.0, 1.2, 1.5, 1.7], "every strategy measured against single"


def test_memory_plot_stacks_the_breakdown_when_rows_carry_it(tmp_path):
    s = Sweep(tmp_path / "sweep")
    parts = {"mem_params_mb": 100.0, "mem_grads_mb": 100.0, "mem_optim_mb": 200.0, "mem_activations_mb": 50.0,
             "mem_temp_mb": 25.0}
    s.add("ddp", 2, 64, 150, mem=600.0, fields=parts)
    summary, runs = summary_of(s.folder)
    plot = plots.memory_figure(summary, runs)
    ax = plot.figure.axes[0]
    assert [c[0].get_width() for c in ax.containers] == [100, 100, 200, 50, 25, 125], "the rest: 600 - 475"
    assert [c.get_label() for c in ax.containers][-1] == "rest of the peak"
    assert "MemTracker" in ax.get_xlabel()
    assert plot.data.loc[0, "rest_mb"] == 125


def lines_of(ax) -> dict[str, list]:
    """label -> y values of every line and error-bar series drawn in `ax`."""
    found = {c.get_label(): list(c.lines[0].get_ydata()) for c in ax.containers if hasattr(c, "lines")}
    found.update({ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines() if not ln.get_label().startswith("_")})
    return found


def test_scaling_plots_draw_the_summary_numbers(scaling_sweep):
    summary, _ = summary_of(scaling_sweep)
    plot = plots.throughput_figure(summary)
    strong, weak = plot.figure.axes[:2]
    assert "strong scaling" in strong.get_title() and "weak scaling" in weak.get_title()
    assert strong.get_ylabel() == "throughput (samples/s)" and strong.get_xlabel() == "devices N (one per rank)"
    drawn = lines_of(strong)
    assert drawn["ddp, G=64"] == [95, 170] and drawn["ddp, G=32"] == [85, 150]
    assert drawn["ideal: N × X_1 (X_1: single, 1 device, G=64)"] == [100, 200]
    drawn = lines_of(weak)
    assert drawn["ddp, 32 per replica"] == [85, 170]
    assert drawn["ideal: N × X_1 (X_1: single, 1 device, G=32)"] == [90, 180]
    saved = plot.data[(plot.data.kind == "strong") & (plot.data.series == "ddp, G=64")]
    assert saved["samples_per_s"].tolist() == [95, 170] and saved["devices"].tolist() == [1, 2]

    plot = plots.efficiency_figure(summary)
    strong, weak = plot.figure.axes[:2]
    drawn = lines_of(strong)
    assert drawn["ddp, G=64"] == pytest.approx([95.0, 85.0]) and drawn["ddp, G=32"] == pytest.approx([850 / 9, 250 / 3])
    assert drawn["ideal (100 %)"] == [100, 100]
    assert lines_of(weak)["ddp, 32 per replica"] == pytest.approx([850 / 9, 850 / 9])  # 85/90 and 170/(2*90)


def test_a_row_of_efficiency_panels_shares_its_y_scale(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("ddp", 1, 32, 40)
    s.add("ddp", 1, 64, 61)
    s.add("ddp", 2, 64, 90)  # weak: 90 / (2 * 40) = 112.5 %, strong: 90 / (2 * 61) = 74 %
    summary, _ = summary_of(s.folder)
    strong, weak = plots.efficiency_figure(summary).figure.axes[:2]
    assert strong.get_ylim() == weak.get_ylim() == (0, 122.5), "the highest point of the row + 10"


def test_memory_step_time_loss_and_breakdown_plots(scaling_sweep):
    summary, runs = summary_of(scaling_sweep)
    label = "ddp · 2 ranks · G=64"

    plot = plots.memory_figure(summary, runs)
    ax = plot.figure.axes[0]
    widths = {t.get_text(): bar.get_width() for t, bar in zip(ax.get_yticklabels(), ax.containers[0], strict=True)}
    assert widths[label] == 600 and widths["single · 1 rank · G=64"] == 510 and len(widths) == 6
    assert "MB" in ax.get_xlabel()

    steps = steps_by_configuration(runs)
    plot = plots.step_time_figure(summary, steps)
    stats = plot.data.set_index("label").loc[label]
    # pooled measured steps: 4 per repeat, each 64/sps seconds for sps 160, 180, 170
    pooled = [1e3 * 64 / sps for sps in (160, 180, 170) for _ in range(STEPS - WARMUP)]
    assert stats["n_steps"] == 12 and stats["median_ms"] == pytest.approx(statistics.median(pooled))
    medians = {ln.get_gid(): ln.get_xdata()[0] for ln in plot.figure.axes[0].get_lines() if ln.get_gid()}
    assert medians[f"median:{label}"] == pytest.approx(statistics.median(pooled)) and len(medians) == 6

    plot = plots.loss_figure(summary, steps)
    drawn = lines_of(plot.figure.axes[0])
    # repeats 0, 1, 2 add 0.00, 0.01, 0.02: their mean adds 0.01
    assert drawn[label] == pytest.approx([2.01 - 0.1 * i for i in range(STEPS)])
    assert plot.figure.axes[0].get_ylabel().startswith("training loss")

    plot = plots.breakdown_figure(summary, steps)
    row = plot.data.set_index("label").loc[label]
    assert row["step_time_ms_mean"] == pytest.approx(statistics.fmean(pooled))
    assert row["data_wait_ms"] == 0 and row["rank_imbalance_ms"] == pytest.approx(0)


# --- figure data: the frames each figure draws (and saves as <name>.csv), without matplotlib -----------


def records(frame: pd.DataFrame) -> list[tuple]:
    return [tuple(r) for r in frame.itertuples(index=False)]


def test_throughput_and_efficiency_data_by_hand(scaling_sweep):
    summary, _ = summary_of(scaling_sweep)
    data = figure_data.throughput_data(summary)
    assert list(data.columns) == ["panel", "kind", "series", "devices", "samples_per_s", "samples_per_s_std"]
    ideal_32, ideal_64 = "ideal: N × X_1 (X_1: single, 1 device, G=32)", "ideal: N × X_1 (X_1: single, 1 device, G=64)"
    assert records(data) == [
        (0, "strong", "single, G=32", 1, 90, 0.0),
        (0, "strong", "ddp, G=32", 1, 85, 0.0),
        (0, "strong", "ddp, G=32", 2, 150, 0.0),
        (0, "strong", "single, G=64", 1, 100, pytest.approx(10.0)),  # std of 100, 110, 90
        (0, "strong", "ddp, G=64", 1, 95, 0.0),  # one run: no std, drawn as 0
        (0, "strong", "ddp, G=64", 2, 170, pytest.approx(10.0)),  # the failed repeat is not counted
        (0, "strong", ideal_32, 1, 90, 0.0),  # N * X_1, X_1 = single G=32
        (0, "strong", ideal_32, 2, 180, 0.0),
        (0, "strong", ideal_64, 1, 100, 0.0),
        (0, "strong", ideal_64, 2, 200, 0.0),
        (0, "weak", "ddp, 32 per replica", 1, 85, 0.0),  # G=32 on 1 rank, G=64 on 2
        (0, "weak", "ddp, 32 per replica", 2, 170, pytest.approx(10.0)),
        (0, "weak", ideal_32, 1, 90, 0.0),
        (0, "weak", ideal_32, 2, 180, 0.0),
    ]
    efficiency = figure_data.efficiency_data(summary)
    assert records(efficiency) == [
        # 100 * X_N / (N * X_1); single alone is its own baseline (100 % by definition) and is left out
        (0, "strong", "ddp, G=32", 1, pytest.approx(100 * 85 / 90)),
        (0, "strong", "ddp, G=32", 2, pytest.approx(100 * 150 / (2 * 90))),
        (0, "strong", "ddp, G=64", 1, pytest.approx(95.0)),
        (0, "strong", "ddp, G=64", 2, pytest.approx(85.0)),
        # weak: at N = 1 the strong figure (same batch), at N = 2 X_2 / (2 * X_1 of G=32)
        (0, "weak", "ddp, 32 per replica", 1, pytest.approx(100 * 85 / 90)),
        (0, "weak", "ddp, 32 per replica", 2, pytest.approx(100 * 170 / (2 * 90))),
    ]


def test_an_ideal_line_starts_at_one_device_even_when_its_series_does_not(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("single", 1, 32, 90)
    s.add("ddp", 2, 64, 170)
    s.add("ddp", 4, 128, 300)
    summary, _ = summary_of(s.folder)
    weak = figure_data.throughput_data(summary).query("kind == 'weak'")
    assert records(weak) == [
        (0, "weak", "ddp, 32 per replica", 2, 170, 0.0),
        (0, "weak", "ddp, 32 per replica", 4, 300, 0.0),
        *[(0, "weak", "ideal: N × X_1 (X_1: single, 1 device, G=32)", n, 90 * n, 0.0) for n in (1, 2, 4)],
    ]


def test_one_strategy_with_two_option_sets_makes_two_named_series(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("single", 1, 64, 100)
    s.add("ddp", 2, 64, 150, options={"bucket_cap_mb": 25})
    s.add("ddp", 2, 64, 170, options={"bucket_cap_mb": 100})
    summary, _ = summary_of(s.folder)
    data = figure_data.throughput_data(summary).set_index("series")
    assert data.loc["ddp (strategy.bucket_cap_mb=25)", "samples_per_s"] == 150
    assert data.loc["ddp (strategy.bucket_cap_mb=100)", "samples_per_s"] == 170
    efficiency = figure_data.efficiency_data(summary).set_index("series")["efficiency_pct"]
    assert efficiency.to_dict() == {"ddp (strategy.bucket_cap_mb=100)": 85.0, "ddp (strategy.bucket_cap_mb=25)": 75.0}


def test_memory_data_by_hand(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("single", 1, 64, 100, mem=500.0)
    s.add("ddp", 2, 64, 150, status="failed", error="boom")
    summary, _ = summary_of(s.folder)
    data = figure_data.memory_data(summary)
    assert records(data) == [("single · 1 rank · G=64", 500.0)], "no breakdown in the rows: the peak alone"

    parts = {"mem_params_mb": 100.0, "mem_grads_mb": 100.0, "mem_optim_mb": 200.0, "mem_activations_mb": 50.0,
             "mem_temp_mb": 25.0}
    s.add("ddp", 2, 64, 150, mem=600.0, fields=parts)
    s.add("ddp", 1, 64, 90, mem=300.0, fields={**parts, "mem_activations_mb": None})
    summary, _ = summary_of(s.folder)
    data = figure_data.memory_data(summary).set_index("label")
    assert list(data.columns) == ["peak_mem_mb", *figure_data.MEMORY_PARTS, "rest_mb"]
    assert data.loc["ddp · 2 ranks · G=64"].tolist() == [600, 100, 100, 200, 50, 25, 125], "rest: 600 - 475"
    assert data.loc["ddp · 1 rank · G=64"].tolist() == [300, 100, 100, 200, 0, 25, 0], "a missing part counts 0"
    assert data.loc["single · 1 rank · G=64"].tolist() == [500, 0, 0, 0, 0, 0, 500]


def steps_frame(times, waits, ranks, losses=None, warmup=1) -> pd.DataFrame:
    """A steps.csv as bench writes it: step time = the slowest rank's."""
    frame = pd.DataFrame(
        {
            "step": range(len(times)),
            "measured": [int(i >= warmup) for i in range(len(times))],
            "step_time_ms": times,
            "loss": losses if losses is not None else [float("nan")] * len(times),
            "data_wait_ms_max": waits,
        }
    )
    for r, rank_times in enumerate(ranks):
        frame[f"step_time_ms_rank{r}"] = rank_times
    return frame


def test_step_time_breakdown_and_loss_data_by_hand(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("ddp", 2, 64, 100)
    s.add("single", 1, 64, 100)
    summary, _ = summary_of(s.folder)
    ddp, single = (line(summary, *c) for c in (("ddp", 2, 64), ("single", 1, 64)))
    repeats = [
        steps_frame([50, 10, 20], [9, 1, 3], [[50, 8, 20], [40, 10, 16]], losses=[2.0, 1.0, 0.5]),
        steps_frame([60, 30, 40], [9, 2, 2], [[60, 30, 36], [50, 26, 40]], losses=[2.2, 1.2, 0.7]),
    ]
    steps = {
        (ddp.config_id, ddp.machine): repeats,
        (single.config_id, single.machine): [steps_frame([5, 5], [0, 0], [[5, 5]], warmup=2)],  # nothing measured
    }
    times = figure_data.step_times(summary, steps)
    assert records(times) == [("ddp · 2 ranks · G=64", t) for t in (10, 20, 30, 40)], "warm-up left out, pooled"
    stats = figure_data.step_time_data(times)
    # quartiles of 10, 20, 30, 40 by linear interpolation: 17.5, 25, 32.5
    assert records(stats) == [("ddp · 2 ranks · G=64", 4, 10, 17.5, 25, 32.5, 40, 25)]

    breakdown = figure_data.breakdown_data(summary, steps)
    # per measured step: wait 1, 3, 2, 2 (mean 2); slowest minus mean rank: 10-9, 20-18, 30-28, 40-38 (mean 1.75)
    assert records(breakdown) == [("ddp · 2 ranks · G=64", 25, 25 - 2 - 1.75, 2, 1.75)]

    loss = figure_data.loss_data(summary, steps)
    assert records(loss) == [(0, "ddp · 2 ranks · G=64", i, pytest.approx(v)) for i, v in enumerate([2.1, 1.1, 0.6])]
    assert records(figure_data.loss_panels(summary, steps)) == [(0, "mlp", 1)], "single has no loss: not drawn"


def test_two_layouts_on_the_same_ranks_are_two_configurations_in_every_figure(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("fsdp", 2, 64, 100, parallel={"dp": -1, "tp": 1, "pp": 1})
    s.add("fsdp", 2, 64, 50, parallel={"dp": -1, "tp": 2, "pp": 1})
    summary, runs = summary_of(s.folder)
    steps = steps_by_configuration(runs)
    labels = ["fsdp · 2 ranks · G=64 · 2×1×1", "fsdp · 2 ranks · G=64 · 1×2×1"]
    assert figure_data.memory_data(summary)["label"].tolist() == labels
    stats = figure_data.step_time_data(figure_data.step_times(summary, steps))
    assert stats["label"].tolist() == labels and stats["median_ms"].tolist() == [640, 1280], "not pooled together"
    assert figure_data.loss_data(summary, steps).groupby("label", sort=False).size().to_dict() == dict.fromkeys(
        labels, STEPS
    )


def test_comparison_data_keeps_configurations_measured_on_both_sides():
    nan = float("nan")
    verdicts = pd.DataFrame(
        {
            "label": ["a", "b"],
            "ratio": [0.9, nan],
            "ratio_spread": [0.01, nan],
            "tolerance_pct": [2.0, nan],
            "change_pct": [-10.0, nan],
            "mem_change_pct": [0.0, nan],
            "verdict": ["regression", "missing"],
            "reason": ["throughput -10.0 %", "not run by the candidate"],
        }
    )
    assert records(figure_data.comparison_data(verdicts)) == [("a", 0.9, 0.01, 2.0, -10.0, 0.0, "regression")]


# --- findings: the answer per objective, before the tables ----------------------------------------------


def profiled(exposed: float) -> dict:
    """The shares a profile=true row carries (compute, communication, exposed, idle in % of the step)."""
    return {"compute_pct": 60.0, "comm_pct": exposed + 5, "comm_exposed_pct": exposed, "idle_pct": 5.0}


def by_objective(folder: Path) -> dict[str, findings.Finding]:
    summary, _ = summary_of(folder)
    return {finding.objective: finding for finding in findings.findings(summary)}


def test_the_fastest_is_named_with_its_exposed_communication_and_the_slowest_with_its_bubble(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("single", 1, 64, 60)
    for repeat, spread in enumerate([-1, 0, 1]):  # 95 % CIs of ±2.5: ddp's and fsdp's do not overlap
        s.add("ddp", 2, 64, 100 + spread, repeat=repeat, fields=profiled(4.0))
        s.add("fsdp", 2, 64, 80 + spread, repeat=repeat, fields=profiled(10.0))
    bubble = {**profiled(30.0), "strategy_facts": {"bubble_fraction": 0.2}}
    s.add("pipeline", 2, 64, 50, parallel={"dp": 1, "tp": 1, "pp": 2}, fields=bubble)
    found = by_objective(s.folder)[findings.THROUGHPUT]
    assert found.best == "ddp · 2 ranks · G=64"
    assert found.text == (
        "Throughput: ddp · 2 ranks · G=64 is fastest at 100 samples/s (median), 25 % faster than fsdp · 2 ranks · "
        "G=64 and 2.0× as fast as the slowest, pipeline · 2 ranks · G=64, which exposes 30.0 % of its profiled "
        "step as communication, loses 20 % of its schedule to the pipeline bubble (predicted) and scales at 42 % "
        "strong-scaling efficiency on 2 devices; it exposes 4.0 % of its profiled step as communication and "
        "scales at 83 % strong-scaling efficiency on 2 devices."
    ), "100/80 = 1.25, 100/50 = 2, 50/(2·60) = 0.42, 100/(2·60) = 0.83"


def test_an_unprofiled_fastest_gets_the_hint_to_profile_and_tokens_are_preferred(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("single", 1, 64, 60, fields={"tokens_per_s": 60 * 128})
    s.add("ddp", 2, 64, 100, fields={"tokens_per_s": 100 * 128})
    found = by_objective(s.folder)[findings.THROUGHPUT]
    assert found.best == "ddp · 2 ranks · G=64"
    assert found.text == (
        "Throughput: ddp · 2 ranks · G=64 is fastest at 12,800 tokens/s (median), 67 % faster than single · 1 "
        f"rank · G=64; it scales at 83 % strong-scaling efficiency on 2 devices; {findings.PROFILE_HINT}; each ran "
        "once, so no interval tells this lead from run-to-run noise (repeats=3 gives one)."
    )


def test_overlapping_confidence_intervals_name_no_winner(tmp_path):
    s = Sweep(tmp_path / "sweep")
    for repeat, spread in enumerate([-10, 0, 10]):  # 95 % CIs of ±24.8
        s.add("ddp", 2, 64, 100 + spread, repeat=repeat, fields={"mfu_pct": 40 + spread / 10})
        s.add("fsdp", 2, 64, 95 + spread, repeat=repeat, fields={"mfu_pct": 38 + spread / 10})
    s.add("tensor", 2, 64, 40, fields={"mfu_pct": 16.0})
    found = by_objective(s.folder)
    assert found[findings.THROUGHPUT].best is None and found[findings.MFU].best is None
    assert found[findings.THROUGHPUT].text.startswith(
        "Throughput: no clear winner between ddp · 2 ranks · G=64 (100 samples/s) and fsdp · 2 ranks · G=64 "
        "(95.0 samples/s): their 95 % confidence intervals overlap, so more repeats are needed to rank them; "
        "both are at least 2.4× as fast as the slowest, tensor · 2 ranks · G=64"
    )
    assert "no clear winner between ddp · 2 ranks · G=64 (40.0 %) and fsdp" in found[findings.MFU].text
    assert " fastest" not in found[findings.THROUGHPUT].text


def test_the_least_memory_names_the_kind_that_differs_most_and_mfu_its_convention(tmp_path):
    s = Sweep(tmp_path / "sweep")
    kinds = {"mem_params_mb": 50.0, "mem_grads_mb": 50.0, "mem_activations_mb": 80.0, "mem_temp_mb": 20.0}
    counted = {"flops_convention": "6NT + 12LT^2d (PaLM): N the weights, T tokens", "peak_source": "measured"}
    s.add("single", 1, 64, 60, mem=300.0, fields={**kinds, "mem_optim_mb": 100.0, **counted, "mfu_pct": 30.0})
    s.add("ddp", 2, 64, 100, mem=300.0, fields={**kinds, "mem_optim_mb": 100.0, **counted, "mfu_pct": 25.0})
    s.add("zero", 2, 64, 90, mem=225.0, fields={**kinds, "mem_optim_mb": 25.0, **counted, "mfu_pct": 22.5})
    found = by_objective(s.folder)
    assert found[findings.MEMORY].best == "zero · 2 ranks · G=64"
    assert found[findings.MEMORY].text == (
        "Memory: zero · 2 ranks · G=64 peaks lowest at 225 MB per rank, 25 % below the heaviest, single · 1 rank · "
        "G=64 (and 1 other) at 300 MB; the biggest difference is its optimizer state: 25.0 MB against 100 MB."
    )
    assert found[findings.MFU].best == "single · 1 rank · G=64"
    assert found[findings.MFU].text == (
        "MFU: single · 1 rank · G=64 makes the best use of its devices at 30.0 % MFU, against 25.0 % for ddp · 2 "
        "ranks · G=64 (model FLOPs by 6NT + 12LT^2d (PaLM), against the measured matmul peak); each ran once, so no "
        "interval tells this lead from run-to-run noise (repeats=3 gives one)."
    )


def test_no_mfu_finding_without_mfu_and_none_for_a_lone_configuration(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("ddp", 2, 64, 100)
    assert by_objective(s.folder) == {}, "nothing to compare with"
    s.add("fsdp", 2, 64, 80, mem=400.0)
    assert set(by_objective(s.folder)) == {findings.THROUGHPUT, findings.MEMORY}


def test_the_findings_come_first_in_the_terminal_summary_md_and_page(tmp_path, capsys):
    s = Sweep(tmp_path / "sweep")
    s.add("single", 1, 64, 60)
    s.add("ddp", 2, 64, 100)
    assert main([str(s.folder), "--no-plots"]) == 0
    sentence = "Throughput: ddp · 2 ranks · G=64 is fastest at 100 samples/s (median)"
    printed = capsys.readouterr().out
    assert printed.index("In short") < printed.index(sentence) < printed.index("bench: 2 runs")
    md = (s.folder / "report" / "summary.md").read_text()
    assert md.index("## In short") < md.index(f"- {sentence}") < md.index("## Summary") < md.index("| model")
    page = (s.folder / "report" / "index.html").read_text()
    assert page.index("<h2>In short</h2>") < page.index(html.escape(sentence)) < page.index("<h2>Summary</h2>")


# --- only figures and axes with data are drawn ----------------------------------------------------------


def test_without_a_one_device_run_no_scaling_efficiency_figure_is_written(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("ddp", 2, 64, 100)
    s.add("fsdp", 2, 64, 80)
    out = s.folder / "report"
    out.mkdir()
    (out / "scaling_efficiency.png").write_bytes(b"an earlier report's, when a 1-device run was there")
    assert main([str(s.folder)]) == 0
    assert not list(out.glob("scaling_efficiency.*")) and (out / "throughput.png").is_file()
    assert "scaling_efficiency" not in (out / "index.html").read_text() + (out / "summary.md").read_text()


def test_a_panel_without_weak_scaling_draws_no_empty_weak_axes(tmp_path):
    s = Sweep(tmp_path / "sweep")
    for batch, nproc in ((32, 1), (64, 1), (64, 2)):  # strong and weak
        s.add("ddp", nproc, batch, 50 * nproc)
    other = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}  # another panel: strong only
    s.add("ddp", 1, 64, 50, optim=other)
    s.add("ddp", 2, 64, 90, optim=other)
    summary, _ = summary_of(s.folder)
    for figure in (plots.throughput_figure(summary).figure, plots.efficiency_figure(summary).figure):
        titles = [ax.get_title() for ax in figure.axes]
        assert len(titles) == 3 and sum("weak" in title for title in titles) == 1, titles
        assert not [t for ax in figure.axes for t in ax.texts if "no " in t.get_text()], "no 'nothing here' axes"


def test_the_loss_axis_counts_whole_steps(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("ddp", 2, 64, 100)
    summary, _ = summary_of(s.folder)
    ddp = line(summary, "ddp", 2, 64)
    three_steps = steps_frame([5, 5, 5], [0, 0, 0], [[5, 5, 5]], losses=[2.0, 1.5, 1.2])
    ax = plots.loss_figure(summary, {(ddp.config_id, ddp.machine): [three_steps]}).figure.axes[0]
    ticks = ax.get_xticks()
    assert len(ticks) >= 3 and all(tick == int(tick) for tick in ticks), ticks


def test_the_page_lists_errors_in_full_below_the_summary_table(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("single", 1, 64, 100)
    error = "launch.nproc: expected 1 with strategy=single (one process, one device), got 2. Change `launch.nproc=`"
    s.add("single", 2, 64, status="skipped", error=error)
    assert main([str(s.folder), "--no-plots"]) == 0
    page = (s.folder / "report" / "index.html").read_text()
    table, below = page.split("<h2>Summary</h2>")[1].split("</table>", 1)
    note = html.escape(f"mlp single, 2 rank(s), G=64 (skipped): {error}")
    assert ">error</th>" not in table, "no column of long texts to widen the table"
    assert f"title=\"{note}\">skipped<sup><a href='#note-1'>1</a></sup></td>" in table, "status: hover and link"
    assert below.startswith(f"</div><ol class='notes'><li id='note-1'>{note}</li></ol>"), "the whole error, below"
    assert '<td class="number">100.0 (n=1)</td>' in table, "numbers are cells the page keeps on one line"
    md = (s.folder / "report" / "summary.md").read_text()
    assert f"| {error[:89]}… |" in md, "the Markdown table keeps its error column"
    assert f"- mlp single, 2 rank(s), G=64 (skipped): {error}" in md


def test_moved_results_and_a_cut_off_line_still_report(tmp_path, capsys):
    s = Sweep(tmp_path / "old")
    s.add("ddp", 1, 16, 50)
    s.add("ddp", 2, 16, 80)
    moved = tmp_path / "moved"
    s.folder.rename(moved)
    with (moved / "runs.jsonl").open("a") as f:
        f.write('{"run_id": "cut off mid-wri')
    assert main([str(moved / "runs.jsonl"), "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    assert f"warning: {moved / 'runs.jsonl'}:3: skipped, not valid JSON" in capsys.readouterr().err
    summary, runs = summary_of(moved)
    assert runs["run_dir"].tolist() == [str(moved / "0_ddp_mlp"), str(moved / "1_ddp_mlp")], "found after the move"
    assert runs["device"].tolist() == ["cpu", "cpu"] and "_row" not in runs, "the frame holds values, not rows"
    loss = plots.loss_figure(summary, steps_by_configuration(runs)).data
    assert set(loss["label"]) == {"ddp · 1 rank · G=16", "ddp · 2 ranks · G=16"}, "steps.csv found after the move"


def test_lines_that_are_not_json_objects_are_skipped_with_file_and_line(tmp_path):
    s = Sweep(tmp_path / "sweep")
    s.add("ddp", 1, 16, 50)
    with (s.folder / "runs.jsonl").open("a") as f:
        f.write("[1, 2]\n\n{not json\n")
    rows, warnings = load_rows([s.folder])
    assert [r["run_id"] for r in rows] == ["0_ddp_mlp"]
    runs = s.folder / "runs.jsonl"
    assert warnings[0] == f"{runs}:2: skipped, not a JSON object"
    assert warnings[1].startswith(f"{runs}:4: skipped, not valid JSON") and len(warnings) == 2


def test_lines_of_any_json_value_or_of_bytes_that_are_not_text_are_skipped(tmp_path, capsys):
    s = Sweep(tmp_path / "sweep")
    s.add("ddp", 1, 16, 50)
    with (s.folder / "runs.jsonl").open("ab") as f:
        f.write(b'42\nnull\n"text"\n{"run_id": "bad \xff byte"}\n')
    assert main([str(s.folder), "--no-plots"]) == 0
    err = capsys.readouterr().err
    for line in (2, 3, 4):
        assert f"runs.jsonl:{line}: skipped, not a JSON object" in err
    assert "runs.jsonl:5: skipped, not UTF-8 text" in err


def test_a_row_missing_fields_is_shown_incomplete_and_counted_nowhere(tmp_path, capsys):
    s = Sweep(tmp_path / "sweep")
    s.add("ddp", 1, 16, 50)
    with (s.folder / "runs.jsonl").open("a") as f:
        f.write(json.dumps({"run_id": "lonely", "samples_per_s": 100.0}) + "\n")
    assert main([str(s.folder), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "runs.jsonl:2: the row lacks status, strategy, model, world_size, global_batch" in err
    summary = list(csv.DictReader((s.folder / "report" / "summary.csv").open()))
    (lonely,) = [line for line in summary if line["status"] == "incomplete"]
    assert (lonely["world_size"], lonely["global_batch"], lonely["samples_per_s"]) == ("", "", ""), "nothing made up"
    assert "| – | – | – | – | – |  |  | incomplete |" in (s.folder / "report" / "summary.md").read_text()


def test_an_out_folder_that_cannot_be_written_exits_2(tmp_path, capsys):
    s = Sweep(tmp_path / "sweep")
    s.add("ddp", 1, 16, 50)
    assert main([str(s.folder), "--out", "/proc/no/such/report"]) == 2
    assert "--out: expected a folder the report can be written to" in capsys.readouterr().err


# --- regression verdict ------------------------------------------------------------------------------


def verdict(tmp_path, *args, **kwargs) -> dict:
    base, cand = two_sides(tmp_path, *args, **kwargs)
    rows_b, _ = load_rows([base])
    rows_c, _ = load_rows([cand])
    frame = runs_frame(rows_c + rows_b)
    out = compare.compare(frame.iloc[len(rows_c) :], frame.iloc[: len(rows_c)])
    assert len(out) == 1
    return out.iloc[0].to_dict()


@pytest.mark.parametrize(
    "cand,expected",
    [
        # baseline median 100, MAD 2; candidate MAD 1: tol = max(3 * (2 + 1), 0.02 * 100) = 9
        ([90, 91, 89], "regression"),  # 90 < 100 - 9
        ([92, 93, 91], "no change"),  # 92 >= 91
        ([110, 111, 109], "improvement"),  # 110 > 109
    ],
)
def test_verdict_against_noise_of_both_sides(tmp_path, cand, expected):
    v = verdict(tmp_path, [100, 102, 98], cand)
    assert v["verdict"] == expected
    assert v["tolerance_pct"] == pytest.approx(9.0)
    assert v["change_pct"] == pytest.approx(cand[0] - 100)
    assert v["ratio"] == pytest.approx(cand[0] / 100)
    assert v["ratio_spread"] == pytest.approx(cand[0] / 100 * (2 / 100 + 1 / cand[0]))


@pytest.mark.parametrize("cand,expected", [(97.5, "regression"), (98.5, "no change")])
def test_single_runs_use_the_minimum_relative_threshold(tmp_path, cand, expected):
    v = verdict(tmp_path, [100], [cand])  # MAD 0 on both sides: tol = 0.02 * 100 = 2
    assert v["verdict"] == expected and v["tolerance_pct"] == pytest.approx(2.0)


@pytest.mark.parametrize("cand_mem,expected", [(1150.0, "regression"), (1050.0, "no change")])
def test_peak_memory_growth_beyond_tolerance_regresses(tmp_path, cand_mem, expected):
    v = verdict(tmp_path, [100, 100, 100], [100, 100, 100], base_mem=1000.0, cand_mem=cand_mem)
    assert v["verdict"] == expected and v["mem_change_pct"] == pytest.approx(cand_mem / 10 - 100)
    if expected == "regression":
        assert "peak memory +15.0 %" in v["reason"]


def test_a_configuration_that_now_fails_regresses_and_a_missing_one_does_not(tmp_path):
    base, cand = Sweep(tmp_path / "base"), Sweep(tmp_path / "cand")
    base.add("ddp", 2, 64, 100)
    base.add("ddp", 1, 64, 60)
    base.add("single", 1, 64, 70)
    cand.add("ddp", 2, 64, status="failed", error="rank 0: OutOfMemoryError")
    cand.add("ddp", 1, 64, 60)
    cand.add("ddp", 1, 32, 40)
    rows_b, _ = load_rows([base.folder])
    rows_c, _ = load_rows([cand.folder])
    frame = runs_frame(rows_c + rows_b)
    out = compare.compare(frame.iloc[len(rows_c) :], frame.iloc[: len(rows_c)]).set_index("label")
    assert out.loc["ddp · 2 ranks · G=64", "verdict"] == "regression"
    assert "OutOfMemoryError" in out.loc["ddp · 2 ranks · G=64", "reason"]
    assert out.loc["ddp · 1 rank · G=64", "verdict"] == "no change"
    assert out.loc["ddp · 1 rank · G=32", "verdict"] == "new"
    assert out.loc["single · 1 rank · G=64", "verdict"] == "missing"


def test_cli_exit_codes_and_k(tmp_path, capsys):
    base, cand = two_sides(tmp_path, [100, 102, 98], [92, 93, 91])
    assert main([str(cand), "--baseline", str(base), "--no-plots"]) == 0
    assert "no regression" in capsys.readouterr().out
    # k = 1: tol = max(1 * 3, 2) = 3, and 92 < 97
    assert main([str(cand), "--baseline", str(base), "--no-plots", "--k", "1"]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    verdicts = list(csv.DictReader((cand / "report" / "verdict.csv").open()))
    assert [v["verdict"] for v in verdicts] == ["regression"]
    assert "k = 1," in (cand / "report" / "verdict.md").read_text()


@pytest.mark.parametrize("change", [{"device_name": "Other CPU"}, {"host": "otherhost"}])
def test_different_hardware_is_refused_unless_allowed(tmp_path, capsys, change):
    base, cand = two_sides(tmp_path, [100], [100], **change)
    assert main([str(cand), "--baseline", str(base), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "different hardware" in err and "--allow-different-hardware" in err
    assert not (cand / "report").exists(), "nothing is written for a refused comparison"
    assert main([str(cand), "--baseline", str(base), "--no-plots", "--allow-different-hardware"]) == 0


def test_bad_input_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs.jsonl" in capsys.readouterr().err


# --- named experiments ----------------------------------------------------------------------------------


# --- rows of the wrong shape -------------------------------------------------------------------------------


def test_run_rows_of_wrong_types_are_skipped_with_file_and_line(tmp_path, capsys):
    """`"status": ["ok"]` and `"config": "x"` crashed the report (AttributeError in bench.configs.flatten); a
    row of the wrong shape is skipped with one warning naming the file, the line and why, the others reported."""
    s = Sweep(tmp_path / "sweep")
    s.add("ddp", 1, 16, 50)
    good = json.loads((s.folder / "runs.jsonl").read_text())
    bad = [{"status": ["ok"]}, {"config": "x"}, {"global_batch": "64"}, {"samples_per_s": float("inf")},
           {"step_time_ms_p50": -1.0}, {"world_size": True}, {"parity_ok": "yes"}]
    with (s.folder / "runs.jsonl").open("a") as f:
        f.writelines(json.dumps({**good, **change}) + "\n" for change in bad)
    assert main([str(s.folder), "--no-plots"]) == 0
    runs = s.folder / "runs.jsonl"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {runs}:2: skipped, status is ['ok'], expected text or null",
        f"warning: {runs}:3: skipped, config is 'x', expected an object or null",
        f"warning: {runs}:4: skipped, global_batch is '64', expected a whole number from 1 to 2**53, or null",
        f"warning: {runs}:5: skipped, samples_per_s is inf, expected a finite number >= 0 or null",
        f"warning: {runs}:6: skipped, step_time_ms_p50 is -1.0, expected a finite number >= 0 or null",
        f"warning: {runs}:7: skipped, world_size is True, expected a whole number from 1 to 2**53, or null",
        f"warning: {runs}:8: skipped, parity_ok is 'yes', expected true, false or null"]
    summary = list(csv.DictReader((s.folder / "report" / "summary.csv").open()))
    assert [(line["strategy"], line["runs"]) for line in summary] == [("ddp", "1")], "the good row alone"


def test_run_folders_skip_what_is_not_a_row_and_name_a_run_folder_without_one(tmp_path, capsys):
    """`--from-run-folders` crashed on a row.json of `[1, 2]`, `null` or `42` (AttributeError: the row-shape
    check of runs.jsonl lines was missing there) and left out a run folder without row.json without a word."""
    s = Sweep(tmp_path / "sweep")
    row = s.add("ddp", 1, 16, 50)
    (s.folder / "0_ddp_mlp" / "row.json").write_text(json.dumps(row))
    for name, content in (("list", "[1, 2]"), ("null", "null"), ("number", "42"), ("typed", '{"status": ["ok"]}')):
        (s.folder / name).mkdir()
        (s.folder / name / "row.json").write_text(content)
    (s.folder / "running").mkdir()  # the controller wrote its config, not yet its row
    (s.folder / "running" / "config.json").write_text(json.dumps(row["config"]))
    (s.folder / ".parity-reference" / "abc").mkdir(parents=True)  # verify=true's reference: never a row
    (s.folder / ".parity-reference" / "abc" / "config.json").write_text("{}")
    assert main([str(s.folder), "--from-run-folders", "--no-plots"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {s.folder / 'running'}: skipped, a run folder without row.json (the run is still going, or "
        "ended before writing its row)",
        f"warning: {s.folder / 'list' / 'row.json'}: skipped, not a JSON object",
        f"warning: {s.folder / 'null' / 'row.json'}: skipped, not a JSON object",
        f"warning: {s.folder / 'number' / 'row.json'}: skipped, not a JSON object",
        f"warning: {s.folder / 'typed' / 'row.json'}: skipped, status is ['ok'], expected text or null"]
    assert "1 runs" in (s.folder / "report" / "summary.md").read_text()


def test_sequence_data_by_hand_a_line_per_context_parallel_degree(tmp_path):
    """Weak scaling in sequence: one rank at 256 and 512 tokens, cp = 2 at 512 and 1,024 (twice the ranks for
    twice the sequence); tokens/s per device and the peak per rank against the sequence length."""
    s = Sweep(tmp_path / "sweep")
    for nproc, cp, seq_len, sps, mem in [(1, 1, 256, 8, 100.0), (1, 1, 512, 4, 200.0), (2, 2, 512, 6, 120.0),
                                         (2, 2, 1024, 3, 210.0)]:
        s.add("fsdp", nproc, 1, sps, mem, fields={"seq_len": seq_len, "cp": cp, "tokens_per_s": sps * seq_len},
              parallel={"dp": 1, "tp": 1, "pp": 1, "cp": cp, "dp_replicate": 1}, model={"name": "mlp",
                                                                                        "seq_len": seq_len})
    summary, _ = summary_of(s.folder)
    assert records(figure_data.sequence_data(summary)) == [
        ("mlp fsdp cp=1", "fsdp", 1, 256, 2048.0, 100.0), ("mlp fsdp cp=1", "fsdp", 1, 512, 2048.0, 200.0),
        ("mlp fsdp cp=2", "fsdp", 2, 512, 1536.0, 120.0), ("mlp fsdp cp=2", "fsdp", 2, 1024, 1536.0, 210.0)]
    assert sorted(summary["layout"]) == ["1×1×1", "1×1×1", "1×1×1 cp2", "1×1×1 cp2"]
    assert plots.sequence_figure(summary) is not None
    s2 = Sweep(tmp_path / "one")
    s2.add("fsdp", 1, 1, 8, fields={"seq_len": 256, "tokens_per_s": 2048.0})
    assert plots.sequence_figure(summary_of(s2.folder)[0]) is None, "one sequence length: nothing to draw"


def test_the_layout_names_context_and_expert_parallelism():
    from bench.report.table import layout

    assert layout({"parallel.dp": 2, "parallel.cp": 2}, 4) == "2×1×1 cp2"
    assert layout({"parallel.dp": 4, "parallel.ep": 2}, 4) == "4×1×1 ep2", "ep of the dp ranks: not in the world"
