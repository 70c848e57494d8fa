"""The data behind each figure, as DataFrames: pure functions of the summary (see `table.summarize`), the
verdicts (`compare.compare`) and the runs' steps.csv frames (`load.steps_by_configuration`).

Each frame is what its figure draws and what is saved beside it as `<name>.csv`. Only ok configurations
appear; failed and skipped ones are in the summary table only. Scaling figures have one panel per
(scaling_id, machine) and one column per kind of scaling; `panel` in their frames is the panel's row.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench.report import scaling
from bench.report.labels import config_label, ok_lines, panel_title

MEMORY_PART_NAMES = {
    "mem_params_mb": "parameters",
    "mem_grads_mb": "gradients",
    "mem_optim_mb": "optimizer state",
    "mem_activations_mb": "activations",
    "mem_temp_mb": "temporaries",
}
MEMORY_PARTS = list(MEMORY_PART_NAMES)
COMPARISON_COLUMNS = ["label", "ratio", "ratio_spread", "tolerance_pct", "change_pct", "mem_change_pct", "verdict"]
EFFICIENCY_COLUMN = {scaling.STRONG: "efficiency_strong", scaling.WEAK: "efficiency_weak"}


def scaling_panels(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """(scaling_id, machine) of the ok configurations, in order: one panel (a row of axes) each."""
    ok = ok_lines(summary)
    return list(dict.fromkeys(zip(ok["scaling_id"], ok["machine"], strict=True)))


def scaling_kinds(summary: pd.DataFrame) -> list[str]:
    """Strong scaling always (one column of axes); weak scaling too when some series has it."""
    return [scaling.STRONG] + ([scaling.WEAK] if scaling.series(summary, scaling.WEAK) else [])


@dataclass(frozen=True)
class ScalingSeries:
    """One line of a scaling panel: its configurations (summary lines, by devices) and its 1-device
    baseline X_1 (an index into the summary, or None). `batch_rank` is the index of its batch among the
    panel's batches: the drawing picks a marker and line style by it."""

    panel: int
    kind: str
    label: str
    strategy: str
    batch_rank: int
    lines: pd.DataFrame
    baseline: object


def scaling_series(summary: pd.DataFrame) -> list[ScalingSeries]:
    """The series of every panel and kind, in drawing order (see `scaling.series`)."""
    by_kind = {kind: scaling.series(summary, kind) for kind in scaling_kinds(summary)}
    out = []
    for row, panel in enumerate(scaling_panels(summary)):
        for kind, series in by_kind.items():
            found = [(key, lines) for key, lines in series if (key[0], key[1]) == panel]
            out += _panel_series(summary, row, kind, found)
    return out


def scaling_axes(summary: pd.DataFrame):
    """(panel row, column, kind, its series) for every axes of a scaling figure, with series or not."""
    found, kinds = scaling_series(summary), scaling_kinds(summary)
    for row in range(len(scaling_panels(summary))):
        for column, kind in enumerate(kinds):
            yield row, column, kind, [s for s in found if s.panel == row and s.kind == kind]


def _panel_series(summary: pd.DataFrame, row: int, kind: str, found: list[tuple]) -> list[ScalingSeries]:
    """`found`: the panel's (key, lines) from `scaling.series` of this kind."""
    batches = sorted({key[3] for key, _ in found})
    labels, baselines = [], []
    for key, lines in found:
        first = lines.iloc[0]
        if kind == scaling.STRONG:
            labels.append(first["strategy"] + (f", G={first['global_batch']}" if len(batches) > 1 else ""))
        else:
            labels.append(f"{first['strategy']}, {first['batch_per_replica']:g} per replica")
        baselines.append(scaling.baseline(summary, first, key[3]))
    # one strategy and batch, two series: two layouts on one N (see scaling.series) or two sets of options
    names = list(labels)
    for i, (_, lines) in enumerate(found):
        twins = [found[j][1] for j, name in enumerate(names) if name == names[i]]
        if len(twins) > 1:
            layouts = {twin["layout"].iloc[-1] for twin in twins}
            apart = lines["layout"].iloc[-1] if len(layouts) > 1 else lines["variant"].iloc[0]
            labels[i] += f" ({apart})" if apart else ""
    return [
        ScalingSeries(row, kind, label, lines["strategy"].iloc[0], batches.index(key[3]), lines, base)
        for (key, lines), label, base in zip(found, labels, baselines, strict=True)
    ]


def ideal_label(summary: pd.DataFrame, baseline) -> str:
    return f"ideal: N × X_1 (X_1: {scaling.label(summary.loc[baseline])})"


def ideal_devices(series: list[ScalingSeries]) -> dict:
    """Baseline index -> the devices its ideal line N·X_1 spans (1 and those of the series measured against it)."""
    spans: dict = {}
    for one in series:
        if one.baseline is not None:
            spans.setdefault(one.baseline, {1}).update(int(n) for n in one.lines["devices"])
    return {base: sorted(devices) for base, devices in spans.items()}


def throughput_data(summary: pd.DataFrame) -> pd.DataFrame:
    """Per panel, kind and series: samples/s (median over repeats) and its std by devices; then the ideal
    lines N·X_1 of the panel's baselines (std 0)."""
    columns = ["panel", "kind", "series", "devices", "samples_per_s", "samples_per_s_std"]
    records = []
    for row, _, kind, found in scaling_axes(summary):
        for one in found:
            std = one.lines["samples_per_s_std"].fillna(0.0)
            points = zip(one.lines["devices"], one.lines["samples_per_s"], std, strict=True)
            records += [(row, kind, one.label, n, x, s) for n, x, s in points]
        for base, devices in ideal_devices(found).items():
            x1 = summary.at[base, "samples_per_s"]
            records += [(row, kind, ideal_label(summary, base), n, n * x1, 0.0) for n in devices]
    return pd.DataFrame.from_records(records, columns=columns)


def efficiency_data(summary: pd.DataFrame) -> pd.DataFrame:
    """Per panel, kind and series: the scaling efficiency in % by devices. A series with no efficiency, or
    the `single` baseline alone (100 % by definition), is left out."""
    records = []
    for row, _, kind, found in scaling_axes(summary):
        column = EFFICIENCY_COLUMN[kind]
        for one in found:
            lines = one.lines.copy()
            if kind == scaling.WEAK:  # at N = 1 the weak baseline is the strong one (G/1 = G)
                at_one = lines["devices"] == 1
                lines.loc[at_one, column] = lines.loc[at_one, "efficiency_strong"]
            points = lines[lines[column].notna()]
            if points.empty or ((points["devices"] == 1).all() and one.strategy == "single"):
                continue
            efficiency = zip(points["devices"], points[column], strict=True)
            records += [(row, kind, one.label, n, 100 * e) for n, e in efficiency]
    return pd.DataFrame.from_records(records, columns=["panel", "kind", "series", "devices", "efficiency_pct"])


def memory_data(summary: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: peak memory (median over repeats of the max over ranks) and, when the rows carry
    it, what the rank holds (MEMORY_PARTS) with the rest of the peak, `rest_mb` (buffers and other tensors;
    in rows of older versions, whose peak was the process's RSS, the process itself)."""
    ok = ok_lines(summary)
    ok = ok[ok["peak_mem_mb"].notna()]
    data = pd.DataFrame(
        {"label": [config_label(line, summary) for _, line in ok.iterrows()], "peak_mem_mb": ok["peak_mem_mb"]}
    ).reset_index(drop=True)
    parts = [column for column in MEMORY_PARTS if column in ok and ok[column].notna().any()]
    for column in parts:
        data[column] = ok[column].fillna(0.0).tolist()
    if parts:
        data["rest_mb"] = (data["peak_mem_mb"] - data[parts].sum(axis=1)).clip(lower=0.0)
    return data


def step_times(summary: pd.DataFrame, steps: dict) -> pd.DataFrame:
    """Every measured step time (the slowest rank's) of each configuration, repeats pooled: label, step_time_ms."""
    pooled = []
    for _, line in ok_lines(summary).iterrows():
        frames = steps.get((line["config_id"], line["machine"])) or []
        times = [f.loc[f["measured"] == 1, "step_time_ms"].astype(float) for f in frames]
        if times and sum(len(t) for t in times):
            pooled.append(pd.DataFrame({"label": config_label(line, summary), "step_time_ms": pd.concat(times)}))
    return pd.concat(pooled, ignore_index=True) if pooled else pd.DataFrame(columns=["label", "step_time_ms"])


def step_time_data(times: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (see `step_times`): how many steps, min, quartiles, max and mean in ms."""
    records = []
    for label, group in times.groupby("label", sort=False):
        t = group["step_time_ms"]
        q = t.quantile([0.25, 0.5, 0.75])
        records.append((label, len(t), t.min(), q[0.25], q[0.5], q[0.75], t.max(), t.mean()))
    columns = ["label", "n_steps", "min_ms", "q1_ms", "median_ms", "q3_ms", "max_ms", "mean_ms"]
    return pd.DataFrame.from_records(records, columns=columns)


def _loss_curves(summary: pd.DataFrame, steps: dict) -> list[list[tuple]]:
    """Per scaling panel with curves: (line, loss per step averaged over repeats, warm-up steps) of each of
    its configurations."""
    curves: dict = {}
    for _, line in ok_lines(summary).iterrows():
        frames = steps.get((line["config_id"], line["machine"]))
        if not frames or frames[0]["loss"].isna().all():
            continue
        loss = pd.concat([f.set_index("step")["loss"] for f in frames], axis=1).mean(axis=1)
        warmup = int((frames[0]["measured"] == 0).sum())
        curves.setdefault((line["scaling_id"], line["machine"]), []).append((line, loss, warmup))
    return [curves[p] for p in scaling_panels(summary) if p in curves]


def loss_data(summary: pd.DataFrame, steps: dict) -> pd.DataFrame:
    """Loss per step of each configuration (mean over repeats), by panel: the scaling panels with a loss."""
    records = [
        (row, config_label(line, summary), step, value)
        for row, curves in enumerate(_loss_curves(summary, steps))
        for line, loss, _ in curves
        for step, value in loss.items()
    ]
    return pd.DataFrame.from_records(records, columns=["panel", "label", "step", "loss"])


def loss_panels(summary: pd.DataFrame, steps: dict) -> pd.DataFrame:
    """Per panel of `loss_data`: its title (see `labels.panel_title`) and warm-up steps (the longest)."""
    panels = [
        (row, panel_title(curves[0][0], summary), max(warmup for _, _, warmup in curves))
        for row, curves in enumerate(_loss_curves(summary, steps))
    ]
    return pd.DataFrame.from_records(panels, columns=["panel", "title", "warmup_steps"])


def breakdown_data(summary: pd.DataFrame, steps: dict) -> pd.DataFrame:
    """Mean measured step time split into compute + communication, data wait and waiting for the slowest rank.

    Per step (from steps.csv): data wait = data_wait_ms_max; rank imbalance = slowest rank's time minus the
    mean of the ranks' times; compute + communication = the rest of the step time (clipped at 0).
    """
    records = []
    for _, line in ok_lines(summary).iterrows():
        frames = steps.get((line["config_id"], line["machine"]))
        measured = pd.concat([f[f["measured"] == 1] for f in frames]) if frames else pd.DataFrame()
        if measured.empty:
            continue
        rank_columns = [c for c in measured.columns if c.startswith("step_time_ms_rank")]
        step = measured["step_time_ms"].mean()
        wait = measured["data_wait_ms_max"].mean() if "data_wait_ms_max" in measured else 0.0
        imbalance = (measured["step_time_ms"] - measured[rank_columns].mean(axis=1)).mean() if rank_columns else 0.0
        records.append((config_label(line, summary), step, max(step - wait - imbalance, 0.0), wait, imbalance))
    columns = ["label", "step_time_ms_mean", "compute_comm_ms", "data_wait_ms", "rank_imbalance_ms"]
    return pd.DataFrame.from_records(records, columns=columns)


TIME_BREAKDOWN_COLUMNS = ["label", "profile_step_time_ms", "overlap_pct", "compute_only_ms", "comm_hidden_ms",
                          "comm_exposed_ms", "data_wait_ms", "idle_ms"]


def time_breakdown_data(summary: pd.DataFrame) -> pd.DataFrame:
    """The profiled configurations' step (`profile=true`, see `bench.measure.breakdown`) in parts that sum to
    it: compute alone, communication hidden behind compute, exposed communication, data wait and idle, from
    the row's shares of the profiled step time (medians over repeats)."""
    records = []
    lines = ok_lines(summary)
    for _, line in lines[lines["compute_pct"].notna()].iterrows():
        step = line["profile_step_time_ms"]
        hidden = line["comm_pct"] - line["comm_exposed_pct"]
        shares = [line["compute_pct"] - hidden, hidden, line["comm_exposed_pct"], line["profile_data_wait_pct"],
                  line["idle_pct"]]
        records.append((config_label(line, summary), step, line["overlap_pct"],
                        *(max(share, 0.0) * step / 100 for share in shares)))
    return pd.DataFrame.from_records(records, columns=TIME_BREAKDOWN_COLUMNS)


def comparison_data(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The configurations measured on both sides: candidate/baseline ratio, spread, tolerance and verdict."""
    both = verdicts[verdicts["ratio"].notna()].reset_index(drop=True)
    return both[COMPARISON_COLUMNS]


def sequence_data(summary: pd.DataFrame) -> pd.DataFrame:
    """Tokens/s per device and peak memory per rank against the sequence length, a series per model, strategy
    and context-parallel degree (weak scaling in sequence: cp = 1, 2, 4 ranks take longer sequences), where a
    model and strategy were run at two sequence lengths or more."""
    ok = ok_lines(summary)
    ok = ok[ok["seq_len"].notna() & ok["tokens_per_s"].notna()]
    records = []
    for (model, strategy), runs in ok.groupby(["model", "strategy"], sort=False):
        if runs["seq_len"].nunique() < 2:
            continue
        for cp, line in runs.groupby("cp", sort=True):
            for _, one in line.sort_values("seq_len").iterrows():
                records.append((f"{model} {strategy} cp={cp}", strategy, int(cp), int(one["seq_len"]),
                                one["tokens_per_s"] / one["devices"], one["peak_mem_mb"]))
    return pd.DataFrame.from_records(records, columns=["series", "strategy", "cp", "seq_len",
                                                       "tokens_per_s_per_device", "peak_mem_mb"])
