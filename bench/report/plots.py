"""The report's figures. Each `*_figure` function returns a `Plot`: the matplotlib Figure and the data
drawn in it (a DataFrame, saved beside the images as `<name>.csv` so a plot can be checked or redrawn).

Figures are built with `matplotlib.figure.Figure` (Agg canvas, no pyplot state), saved as PNG and SVG.
Only ok runs are drawn; failed and skipped configurations appear in the summary table only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from bench.report import scaling
from bench.report.load import read_steps

IDEAL_STYLE = {"color": "0.45", "linestyle": "--", "linewidth": 1.2}
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


@dataclass
class Plot:
    name: str
    figure: Figure
    data: pd.DataFrame


def ok_lines(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["samples_per_s"].notna()]


def strategy_colors(summary: pd.DataFrame) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    names = sorted(summary["strategy"].dropna().unique(), key=lambda s: (s != "single", s))
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def several_machines(summary: pd.DataFrame) -> bool:
    """Whether the ok configurations ran on more than one machine (then labels name it)."""
    return ok_lines(summary)["machine"].nunique() > 1


def config_label(line: pd.Series, summary: pd.DataFrame) -> str:
    """e.g. `ddp · 2 ranks · G=64`, prefixed by the model and suffixed by the variant when they vary."""
    n = int(line["world_size"])
    parts = [line["strategy"], f"{n} rank" + ("s" if n > 1 else ""), f"G={line['global_batch']}"]
    if line["devices"] != n:
        parts.insert(2, f"{line['devices']} devices")
    if summary["model"].nunique() > 1:
        parts.insert(0, line["model"])
    if line["variant"]:
        parts.append(line["variant"])
    if several_machines(summary):
        parts.append(str(line["machine"]))
    return " · ".join(parts)


def panel_title(line: pd.Series, summary: pd.DataFrame) -> str:
    """A scaling panel: the model, and whatever else distinguishes it from the other panels."""
    extra = [p for p in line["variant"].split(", ") if p and not p.startswith(("launch.", "strategy."))]
    if several_machines(summary):
        extra.append(str(line["machine"]))
    return line["model"] + (f" ({', '.join(extra)})" if extra else "")


def _panels(summary: pd.DataFrame) -> list[tuple[str, str]]:
    ok = ok_lines(summary)
    return list(dict.fromkeys(zip(ok["scaling_id"], ok["machine"], strict=True)))


def _devices_axis(ax, sizes, summary: pd.DataFrame) -> None:
    sizes = sorted({int(s) for s in sizes})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(s) for s in sizes])
    if len(sizes) == 1:
        ax.set_xlim(sizes[0] / 1.5, sizes[0] * 1.5)
    ok = ok_lines(summary)
    one_per_rank = (ok["devices"] == ok["world_size"]).all()
    ax.set_xlabel("devices N (one per rank)" if one_per_rank else "devices N")
    ax.grid(True, alpha=0.3)


def _kinds(summary: pd.DataFrame) -> list[str]:
    kinds = [scaling.STRONG]
    if scaling.series(summary, scaling.WEAK):
        kinds.append(scaling.WEAK)
    return kinds


KIND_TITLE = {
    scaling.STRONG: "strong scaling (global batch fixed)",
    scaling.WEAK: "weak scaling (batch per replica fixed)",
}


@dataclass
class Series:
    """One line of a scaling panel: its configurations (by devices), label, style and baseline index."""

    label: str
    lines: pd.DataFrame
    style: dict
    baseline: object  # index into the summary, or None


def _panel_series(summary: pd.DataFrame, panel: tuple[str, str], kind: str) -> list[Series]:
    """The series of one panel and kind: colour per strategy, line style and marker per batch size."""
    colors = strategy_colors(summary)
    found = [(k, s) for k, s in scaling.series(summary, kind) if (k[0], k[1]) == panel]
    batches = sorted({k[3] for k, _ in found})
    out = []
    for key, lines in found:
        first = lines.iloc[0]
        b = batches.index(key[3])
        if kind == scaling.STRONG:
            label = first["strategy"] + (f", G={first['global_batch']}" if len(batches) > 1 else "")
            base = scaling.baseline(summary, first, first["global_batch"])
        else:
            label = f"{first['strategy']}, {first['batch_per_replica']:g} per replica"
            base = scaling.baseline(summary, first, first["batch_per_replica"])
        style = {
            "color": colors[first["strategy"]],
            "marker": MARKERS[b % len(MARKERS)],
            "linestyle": LINESTYLES[b % len(LINESTYLES)] if len(lines) > 1 else "none",
        }
        out.append(Series(label, lines, style, base))
    labels = [series.label for series in out]
    for series in out:  # two layouts of one strategy and batch (see scaling.series): name the layout
        if labels.count(series.label) > 1:
            series.label += f" ({series.lines['layout'].iloc[-1]})"
    return out


def _panel_title(summary: pd.DataFrame, series: list[Series], kind: str) -> str:
    if not series:
        return KIND_TITLE[kind]
    return f"{panel_title(series[0].lines.iloc[0], summary)} — {KIND_TITLE[kind]}"


def _scaling_axes(summary: pd.DataFrame, height: float):
    """A figure with one row per panel (model/config/device) and one column per kind of scaling found."""
    panels = _panels(summary)
    if not panels:
        return None, [], [], []
    kinds = _kinds(summary)
    fig = Figure(figsize=(6.4 * len(kinds), height * len(panels)), layout="constrained")
    return fig, fig.subplots(len(panels), len(kinds), squeeze=False), panels, kinds


def throughput_figure(summary: pd.DataFrame) -> Plot | None:
    """Samples/s vs devices per strategy (median, error bar: std over repeats) with the ideal N·X_1."""
    fig, axes, panels, kinds = _scaling_axes(summary, 4.4)
    if fig is None:
        return None
    records = []
    for row, panel in enumerate(panels):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            found = _panel_series(summary, panel, kind)
            sizes = {1}
            ideals: dict = {}
            for series in found:
                x = series.lines["devices"].tolist()
                y = series.lines["samples_per_s"].tolist()
                err = series.lines["samples_per_s_std"].fillna(0.0).tolist()
                ax.errorbar(x, y, yerr=err, label=series.label, capsize=3, **series.style)
                sizes.update(x)
                records += [
                    {
                        "panel": row,
                        "kind": kind,
                        "series": series.label,
                        "devices": a,
                        "samples_per_s": b,
                        "samples_per_s_std": c,
                    }
                    for a, b, c in zip(x, y, err, strict=True)
                ]
                if series.baseline is not None:
                    ideals.setdefault(series.baseline, set()).update(x)
            for base, xs in ideals.items():
                x1 = summary.at[base, "samples_per_s"]
                xs = sorted({1, *xs})
                label = f"ideal: N × X_1 (X_1: {scaling.label(summary.loc[base])})"
                ax.plot(xs, [n * x1 for n in xs], label=label, **IDEAL_STYLE)
                if len(ideals) > 1:  # several grey lines: name each at its end
                    ax.annotate(
                        f"ideal, G={summary.at[base, 'global_batch']}",
                        (xs[-1], xs[-1] * x1),
                        xytext=(-4, 4),
                        textcoords="offset points",
                        ha="right",
                        fontsize="x-small",
                        color="0.35",
                    )
                records += [
                    {
                        "panel": row,
                        "kind": kind,
                        "series": label,
                        "devices": n,
                        "samples_per_s": n * x1,
                        "samples_per_s_std": 0.0,
                    }
                    for n in xs
                ]
            _devices_axis(ax, sizes, summary)
            ax.set_ylim(bottom=0)
            ax.set_ylabel("throughput (samples/s)")
            ax.set_title(_panel_title(summary, found, kind))
            if found:
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "no series of this kind", transform=ax.transAxes, ha="center", color="0.5")
    fig.suptitle("Throughput vs devices (median over repeats; bars: ±1 std)")
    return Plot("throughput", fig, pd.DataFrame.from_records(records))


def efficiency_figure(summary: pd.DataFrame) -> Plot | None:
    """Scaling efficiency E(N) = X_N / (N·X_1) in %, strong and weak, with the 100 % line."""
    fig, axes, panels, kinds = _scaling_axes(summary, 4.2)
    if fig is None:
        return None
    records = []
    column = {scaling.STRONG: "efficiency_strong", scaling.WEAK: "efficiency_weak"}
    for row, panel in enumerate(panels):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            found = _panel_series(summary, panel, kind)
            sizes = {1}
            drawn = 0
            for series in found:
                lines = series.lines.copy()
                if kind == scaling.WEAK:  # at N = 1 the weak baseline is the strong one (G/1 = G)
                    one = lines["devices"] == 1
                    lines.loc[one, column[kind]] = lines.loc[one, "efficiency_strong"]
                points = lines[lines[column[kind]].notna()]
                if points.empty or ((points["devices"] == 1).all() and points["strategy"].iloc[0] == "single"):
                    continue  # nothing, or the baseline against itself: 100 % by definition
                x = points["devices"].tolist()
                y = (100 * points[column[kind]]).tolist()
                style = {**series.style, "linestyle": series.style["linestyle"] if len(x) > 1 else "none"}
                ax.plot(x, y, label=series.label, **style)
                sizes.update(x)
                drawn += 1
                records += [
                    {"panel": row, "kind": kind, "series": series.label, "devices": a, "efficiency_pct": b}
                    for a, b in zip(x, y, strict=True)
                ]
            ax.axhline(100, label="ideal (100 %)", **IDEAL_STYLE)
            _devices_axis(ax, sizes, summary)
            top = max([110.0] + [r["efficiency_pct"] + 10 for r in records if r["panel"] == row])
            ax.set_ylim(0, top)
            ax.set_ylabel("scaling efficiency (%)")
            ax.set_title(_panel_title(summary, found, kind))
            ax.legend(fontsize="small")
            if not drawn:
                ax.text(
                    0.5,
                    0.5,
                    "no configuration with a 1-process baseline",
                    transform=ax.transAxes,
                    ha="center",
                    color="0.5",
                )
    fig.suptitle("Scaling efficiency E(N) = X_N / (N · X_1), X = median samples/s")
    return Plot("scaling_efficiency", fig, pd.DataFrame.from_records(records))


def _bar_height(count: int) -> float:
    return max(2.6, 0.45 * count + 1.4)


MEMORY_PARTS = [
    ("mem_params_mb", "parameters", "C0"),
    ("mem_grads_mb", "gradients", "C1"),
    ("mem_optim_mb", "optimizer state", "C2"),
    ("mem_activations_mb", "activations + workspace", "C3"),
]


def memory_figure(summary: pd.DataFrame, runs: pd.DataFrame) -> Plot | None:
    """Peak memory per configuration (median over repeats of the max over ranks), split into what the rank
    holds when the rows carry the breakdown (parameters, gradients, optimizer state, activations; the rest of
    the peak is the process itself: on CPU the interpreter and libraries)."""
    ok = ok_lines(summary)
    ok = ok[ok["peak_mem_mb"].notna()]
    if ok.empty:
        return None
    labels = [config_label(line, summary) for _, line in ok.iterrows()]
    peaks = ok["peak_mem_mb"].tolist()
    fig = Figure(figsize=(9, _bar_height(len(ok))), layout="constrained")
    ax = fig.subplots()
    positions = list(range(len(ok)))[::-1]
    data = pd.DataFrame({"label": labels, "peak_mem_mb": peaks})
    parts = [p for p in MEMORY_PARTS if p[0] in ok and ok[p[0]].notna().any()]
    if parts:
        left = [0.0] * len(ok)
        for column, name, color in parts:
            values = ok[column].fillna(0.0).tolist()
            ax.barh(positions, values, left=left, label=name, color=color)
            data[column] = values
            left = [a + b for a, b in zip(left, values, strict=True)]
        rest = [max(peak - used, 0.0) for peak, used in zip(peaks, left, strict=True)]
        ax.barh(positions, rest, left=left, label="rest of the process", color="0.8")
        data["rest_mb"] = rest
        fig.legend(loc="outside lower center", ncol=len(parts) + 1, fontsize="small")
        ends = [a + b for a, b in zip(left, rest, strict=True)]
    else:
        colors = strategy_colors(summary)
        ax.barh(positions, peaks, color=[colors[s] for s in ok["strategy"]])
        ends = peaks
    for pos, end, peak in zip(positions, ends, peaks, strict=True):
        ax.annotate(
            f"{peak:,.0f} MB", (end, pos), xytext=(3, 0), textcoords="offset points", va="center", fontsize="small"
        )
    ax.set_yticks(positions, labels)
    ax.set_xlim(0, max(ends) * 1.18)
    devices = set(runs.loc[runs["status"] == "ok", "_row"].map(lambda r: r.get("device")))
    what = {
        frozenset({"cpu"}): "peak RSS per rank, CPU",
        frozenset({"cuda"}): "peak allocated CUDA memory per rank",
    }.get(frozenset(devices), "peak memory per rank (CUDA: allocated; CPU: RSS)")
    ax.set_xlabel(f"{what} (MB, max over ranks)")
    ax.set_title("Peak memory per configuration (median over repeats)")
    ax.grid(True, axis="x", alpha=0.3)
    return Plot("peak_memory", fig, data)


def _steps_by_config(summary: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """config_id -> the steps.csv frames of its ok runs."""
    found = {}
    ok_runs = runs[runs["status"] == "ok"]
    for _, line in ok_lines(summary).iterrows():
        mine = ok_runs[(ok_runs["config_id"] == line["config_id"]) & (ok_runs["machine"] == line["machine"])]
        frames = [f for f in (read_steps(row) for row in mine["_row"]) if f is not None]
        if frames:
            found[(line["config_id"], line["machine"])] = frames
    return found


def step_time_figure(summary: pd.DataFrame, runs: pd.DataFrame, steps: dict | None = None) -> Plot | None:
    """Distribution of measured step times (max over ranks), repeats pooled: one box per configuration."""
    steps = _steps_by_config(summary, runs) if steps is None else steps
    ok = ok_lines(summary)
    boxes, labels, records = [], [], []
    for _, line in ok.iterrows():
        frames = steps.get((line["config_id"], line["machine"]))
        if not frames:
            continue
        times = pd.concat([f.loc[f["measured"] == 1, "step_time_ms"] for f in frames]).astype(float)
        if times.empty:
            continue
        label = config_label(line, summary)
        boxes.append(times.tolist())
        labels.append(label)
        q = times.quantile([0.25, 0.5, 0.75])
        records.append(
            {
                "label": label,
                "n_steps": len(times),
                "min_ms": times.min(),
                "q1_ms": q[0.25],
                "median_ms": q[0.5],
                "q3_ms": q[0.75],
                "max_ms": times.max(),
                "mean_ms": times.mean(),
            }
        )
    if not boxes:
        return None
    fig = Figure(figsize=(9, _bar_height(len(boxes))), layout="constrained")
    ax = fig.subplots()
    positions = list(range(1, len(boxes) + 1))[::-1]
    colors = strategy_colors(summary)
    parts = ax.boxplot(
        boxes,
        positions=positions,
        orientation="horizontal",
        widths=0.6,
        patch_artist=True,
        showmeans=True,
        meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 5},
        medianprops={"color": "black", "linewidth": 1.5},
    )
    strategies = [
        ok.loc[ok.apply(lambda r, lab=lab: config_label(r, summary) == lab, axis=1), "strategy"].iloc[0]
        for lab in labels
    ]
    for patch, median, strategy, label in zip(parts["boxes"], parts["medians"], strategies, labels, strict=True):
        patch.set_facecolor(colors[strategy])
        patch.set_alpha(0.55)
        median.set_gid(f"median:{label}")  # lets tests (and scripts) find each box's median line
    ax.set_yticks(positions, labels)
    ax.set_xlabel("step time (ms), slowest rank per step; warm-up excluded, repeats pooled")
    ax.set_title("Step-time distribution (box: quartiles, whiskers: 1.5 IQR, ◇: mean)")
    ax.grid(True, axis="x", alpha=0.3)
    return Plot("step_time", fig, pd.DataFrame.from_records(records))


def loss_figure(summary: pd.DataFrame, runs: pd.DataFrame, steps: dict | None = None) -> Plot | None:
    """Loss per step (mean over repeats), one panel per model: same model and batch => curves overlap."""
    steps = _steps_by_config(summary, runs) if steps is None else steps
    ok = ok_lines(summary)
    panels = _panels(summary)
    colors = strategy_colors(summary)
    records = []
    curves: dict = {}
    for _, line in ok.iterrows():
        frames = steps.get((line["config_id"], line["machine"]))
        if not frames or frames[0]["loss"].isna().all():
            continue
        loss = pd.concat([f.set_index("step")["loss"] for f in frames], axis=1).mean(axis=1)
        warmup = int((frames[0]["measured"] == 0).sum())
        curves.setdefault((line["scaling_id"], line["machine"]), []).append((line, loss, warmup))
    panels = [p for p in panels if p in curves]
    if not panels:
        return None
    fig = Figure(figsize=(8, 4.0 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)
    for row, panel in enumerate(panels):
        ax = axes[row][0]
        warmup = max(w for _, _, w in curves[panel])
        for i, (line, loss, _) in enumerate(curves[panel]):
            label = config_label(line, summary)
            ax.plot(
                loss.index,
                loss.values,
                label=label,
                color=colors[line["strategy"]],
                linestyle=LINESTYLES[i % len(LINESTYLES)],
                marker=MARKERS[i % len(MARKERS)],
                markersize=3,
                alpha=0.85,
            )
            records.extend({"panel": row, "label": label, "step": s, "loss": v} for s, v in loss.items())
        if warmup:
            ax.axvspan(-0.5, warmup - 0.5, color="0.9", label="warm-up (not timed)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over ranks)")
        ax.set_title(f"{panel_title(curves[panel][0][0], summary)} — loss per step (mean over repeats)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Loss curves (same model and global batch: the curves of all strategies should coincide)")
    return Plot("loss", fig, pd.DataFrame.from_records(records))


def breakdown_figure(summary: pd.DataFrame, runs: pd.DataFrame, steps: dict | None = None) -> Plot | None:
    """Mean measured step time split into compute + communication, data wait and waiting for the slowest rank.

    Per step (from steps.csv): data wait = data_wait_ms_max; rank imbalance = slowest rank's time minus the
    mean of the ranks' times; compute + communication = the rest of the step time (clipped at 0).
    """
    steps = _steps_by_config(summary, runs) if steps is None else steps
    records = []
    for _, line in ok_lines(summary).iterrows():
        frames = steps.get((line["config_id"], line["machine"]))
        if not frames:
            continue
        measured = pd.concat([f[f["measured"] == 1] for f in frames])
        if measured.empty:
            continue
        rank_cols = [c for c in measured.columns if c.startswith("step_time_ms_rank")]
        step = measured["step_time_ms"].mean()
        wait = measured["data_wait_ms_max"].mean() if "data_wait_ms_max" in measured else 0.0
        imbalance = (measured["step_time_ms"] - measured[rank_cols].mean(axis=1)).mean() if rank_cols else 0.0
        records.append(
            {
                "label": config_label(line, summary),
                "step_time_ms_mean": step,
                "compute_comm_ms": max(step - wait - imbalance, 0.0),
                "data_wait_ms": wait,
                "rank_imbalance_ms": imbalance,
            }
        )
    if not records:
        return None
    data = pd.DataFrame.from_records(records)
    fig = Figure(figsize=(9, _bar_height(len(data))), layout="constrained")
    ax = fig.subplots()
    positions = list(range(len(data)))[::-1]
    left = [0.0] * len(data)
    parts = [
        ("compute_comm_ms", "compute + communication", "C0"),
        ("data_wait_ms", "data wait", "C1"),
        ("rank_imbalance_ms", "waiting for the slowest rank", "C3"),
    ]
    for column, label, color in parts:
        ax.barh(positions, data[column], left=left, label=label, color=color)
        left = [a + b for a, b in zip(left, data[column], strict=True)]
    totals = [
        f"{r.step_time_ms_mean:.1f} ms (data {r.data_wait_ms:.2f}, slowest rank {r.rank_imbalance_ms:.2f})"
        for r in data.itertuples()
    ]
    ax.bar_label(ax.containers[-1], labels=totals, padding=3, fontsize="small")
    ax.set_yticks(positions, data["label"])
    ax.set_xlim(0, max(left) * 1.6)
    ax.set_xlabel("mean step time (ms), warm-up excluded, repeats pooled")
    ax.set_title("Step-time breakdown (mean over measured steps)")
    fig.legend(loc="outside lower center", ncol=3, fontsize="small")
    ax.grid(True, axis="x", alpha=0.3)
    return Plot("breakdown", fig, data)


def comparison_figure(verdicts: pd.DataFrame) -> Plot | None:
    """Candidate/baseline throughput ratio per configuration with its spread and the tolerance band."""
    both = verdicts[verdicts["ratio"].notna()].reset_index(drop=True)
    if both.empty:
        return None
    fig = Figure(figsize=(9, _bar_height(len(both))), layout="constrained")
    ax = fig.subplots()
    positions = list(range(len(both)))[::-1]
    tolerance = both["tolerance_pct"] / 100
    ax.barh(positions, 2 * tolerance, left=1 - tolerance, height=0.6, color="0.88", label="tolerance (no change)")
    ax.axvline(1.0, color="0.4", linewidth=1)
    colors = {"regression": "C3", "improvement": "C2"}
    for pos, line in zip(positions, both.itertuples(), strict=True):
        color = colors.get(line.verdict, "C0")
        ax.errorbar(line.ratio, pos, xerr=line.ratio_spread, fmt="o", color=color, capsize=4, markersize=7)
        note = f"{line.change_pct:+.1f} % {line.verdict}"
        if pd.notna(line.mem_change_pct) and abs(line.mem_change_pct) >= 1:
            note += f" (memory {line.mem_change_pct:+.1f} %)"
        ax.annotate(
            note,
            (line.ratio + line.ratio_spread, pos),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize="small",
            color=color,
        )
    ax.set_yticks(positions, both["label"])
    reach = max((both["ratio"] - 1).abs().max() + both["ratio_spread"].max(), tolerance.max(), 0.05)
    ax.set_xlim(1 - 1.3 * reach, 1 + 2.2 * reach)
    ax.set_ylim(-0.7, len(both) - 0.3)
    ax.set_xlabel("candidate / baseline throughput (ratio of median samples/s; bar: MAD spread)")
    ax.set_title("Candidate vs baseline per configuration (red: regression, green: improvement)")
    ax.legend(fontsize="small", loc="lower left")
    ax.grid(True, axis="x", alpha=0.3)
    data = both[["label", "ratio", "ratio_spread", "tolerance_pct", "change_pct", "mem_change_pct", "verdict"]]
    return Plot("comparison", fig, data)


def report_figures(summary: pd.DataFrame, runs: pd.DataFrame) -> list[Plot]:
    steps = _steps_by_config(summary, runs)
    made = [
        throughput_figure(summary),
        efficiency_figure(summary),
        memory_figure(summary, runs),
        step_time_figure(summary, runs, steps),
        loss_figure(summary, runs, steps),
        breakdown_figure(summary, runs, steps),
    ]
    return [p for p in made if p is not None]


def save(plot: Plot, out: Path) -> list[Path]:
    """<name>.png, <name>.svg and <name>.csv (the data drawn) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{plot.name}.png", out / f"{plot.name}.svg", out / f"{plot.name}.csv"]
    plot.figure.savefig(paths[0], dpi=120)
    plot.figure.set_layout_engine("none")  # keep the layout just computed: the SVG needs no second pass
    plot.figure.savefig(paths[1])
    plot.data.to_csv(paths[2], index=False)
    return paths
