"""The report folder: summary.csv/.md, verdict.csv/.md, the plots (PNG, SVG, data CSV) and index.html."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from bench.report import compare, plots, render
from bench.report.findings import Finding

INTERNAL_COLUMNS = ["scaling_id", "strategy_id"]
IN_SHORT = "In short"

NOTES = (
    "samples/s: mean over the ok repeats of a configuration (n = ok runs) with its 95 % confidence interval, "
    "mean ± t(0.975, n-1)·s/√n (Student t, every repeat kept); the median is used for speedup, efficiency, "
    "the plots and the regression verdict. Failed and skipped runs are listed but excluded from every number. "
    "speedup = X_N / X_1 and efficiency strong = X_N / (N·X_1), X_1 the 1-device run (single if present) with "
    "the same global batch; efficiency weak = X_N / (N·X_1), X_1 the 1-device run with the same batch per "
    "data-parallel replica. Δ loss vs single: final loss minus the single-device run's."
)


def write_report(
    out: Path,
    summary: pd.DataFrame,
    runs: pd.DataFrame,
    sources: list[str],
    figures: list[plots.Plot],
    in_short: list[Finding],
    verdicts: pd.DataFrame | None = None,
    thresholds: compare.Thresholds | None = None,
    baseline_sources: list[str] | None = None,
) -> list[Path]:
    """Everything into `out`; returns the paths written (tables first, then plots, then index.html)."""
    out.mkdir(parents=True, exist_ok=True)
    table = render.summary_display(summary)
    written = write_summary(out, summary, table, runs, sources, [f.name for f in figures], in_short)
    # errors as numbered notes below the table: as a column they made it wider than a 1,400 px window
    errors = [error_note(line) for _, line in summary.iterrows()]
    summary_html = render.html_table(table.drop(columns="error", errors="ignore"), errors)
    sections = [("Summary", summary_html + f"<p>{html.escape(NOTES)}</p>")]
    if verdicts is not None:
        shown = render.verdict_display(verdicts)
        written += write_verdict(out, verdicts, shown, thresholds, baseline_sources or [])
        rule = f"<p>Rule: {html.escape(compare.rule(thresholds))}</p>"
        sections.insert(0, ("Regression verdict", render.html_table(shown) + rule))
    if in_short:
        sections.insert(0, (IN_SHORT, render.html_list([finding.text for finding in in_short])))
    plots.remove_stale(out, figures)
    for figure in figures:
        written += plots.save(figure, out)
    index = out / "index.html"
    index.write_text(render.index_html("bench report", sources, sections, [f.name for f in figures]))
    return [*written, index]


def write_summary(
    out: Path, summary, table, runs, sources: list[str], plot_names: list[str], in_short: list[Finding]
) -> list[Path]:
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    summary.drop(columns=INTERNAL_COLUMNS).to_csv(csv_path, index=False)
    counts = ", ".join(f"{n} {status}" for status, n in runs["status"].value_counts().items())
    lines = [
        "# bench report",
        "",
        "Results: " + ", ".join(f"`{s}`" for s in sources),
        "",
        f"{len(runs)} runs ({counts}) in {len(summary)} configurations.",
        "",
    ]
    if in_short:
        lines += [f"## {IN_SHORT}", "", *(f"- {finding.text}" for finding in in_short), "", "## Summary", ""]
    lines += [render.markdown_table(table), NOTES, ""]
    failed = summary[summary["error"] != ""]
    if len(failed):
        lines += ["## Errors", ""]
        lines += [f"- {error_note(line)}" for _, line in failed.iterrows()]
        lines.append("")
    if plot_names:
        lines += ["## Plots", ""] + [f"![{name}]({name}.png)\n" for name in plot_names]
    md_path.write_text("\n".join(lines))
    return [csv_path, md_path]


def error_note(line: pd.Series) -> str:
    """e.g. `mlp ddp, 4 rank(s), G=64 (failed): rank 3: exited with code 3`; "" for a line without error."""
    return f"{where(line)} ({line['status']}): {line['error']}" if line["error"] else ""


def where(line: pd.Series) -> str:
    """e.g. `mlp ddp, 2 rank(s), G=64` (a field the row lacks as a dash)."""
    model, strategy, world, batch = (render.MISSING if pd.isna(line[k]) else line[k]
                                     for k in ("model", "strategy", "world_size", "global_batch"))
    return f"{model} {strategy}, {world} rank(s), G={batch}"


def write_verdict(out: Path, verdicts, shown, thresholds, baseline_sources: list[str]) -> list[Path]:
    csv_path, md_path = out / "verdict.csv", out / "verdict.md"
    verdicts.to_csv(csv_path, index=False)
    lines = [
        "# bench regression verdict",
        "",
        "Baseline: " + ", ".join(f"`{p}`" for p in baseline_sources),
        "",
        render.markdown_table(shown),
        f"Rule: {compare.rule(thresholds)}",
        "",
    ]
    md_path.write_text("\n".join(lines))
    return [csv_path, md_path]
