"""Tables as text: the formatted summary and verdict tables for Markdown, HTML and the terminal (rich)."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

ERROR_WIDTH = 90


def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return fmt.format(value)


def _short(text, width: int = ERROR_WIDTH) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


MISSING = "–"


def shown(column: pd.Series) -> pd.Series:
    """The values as text, a missing one (a row that lacks the field) as a dash rather than `nan` or `<NA>`."""
    return column.astype(object).where(column.notna(), MISSING).astype(str)


def throughput_cell(line: pd.Series) -> str:
    """`mean [95 % CI] (n=3)`; `value (n=1)` for one run; empty when nothing ran ok."""
    if math.isnan(line["samples_per_s_mean"]):
        return ""
    n = int(line["ok_runs"])
    low, high = line.get("samples_per_s_ci95_low", math.nan), line.get("samples_per_s_ci95_high", math.nan)
    spread = "" if n < 2 or math.isnan(low) else f" [{low:,.1f}, {high:,.1f}]"
    return f"{line['samples_per_s_mean']:,.1f}{spread} (n={n})"


def parity_cell(line: pd.Series) -> str:
    """`ok 1.2e-06` / `FAIL 3.4e-02` for runs made with verify=true; empty otherwise."""
    if math.isnan(line["parity_max_rel_diff"]):
        return ""
    return f"{'ok' if line['parity_ok'] else 'FAIL'} {line['parity_max_rel_diff']:.1e}"


def summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's columns a reader needs, formatted; columns that are empty everywhere are dropped."""
    cols = {
        "model": shown(summary["model"]),
        "strategy": shown(summary["strategy"]),
        "ranks": shown(summary["world_size"]),
        "devices": shown(summary["devices"]),
        "global batch": shown(summary["global_batch"]),
        "batch/replica": summary["batch_per_replica"].map(lambda v: _num(v, "{:g}")),
        "dp×tp×pp": summary["layout"],
        "variant": summary["variant"],
        "machine": summary["machine"],
        "status": summary["status"],
        "samples/s mean [95% CI]": summary.apply(throughput_cell, axis=1),
        "samples/s median": summary["samples_per_s"].map(lambda v: _num(v, "{:,.1f}")),
        "tokens/s median": summary["tokens_per_s"].map(lambda v: _num(v, "{:,.0f}")),
        "step ms p50": summary["step_time_ms_p50"].map(lambda v: _num(v, "{:.2f}")),
        "step ms p90": summary["step_time_ms_p90"].map(lambda v: _num(v, "{:.2f}")),
        "peak mem MB": summary["peak_mem_mb"].map(lambda v: _num(v, "{:,.0f}")),
        "scaling": summary["scaling"],
        "speedup": summary["speedup"].map(lambda v: _num(v, "{:.2f}×")),
        "efficiency strong": summary["efficiency_strong"].map(lambda v: _num(100 * v, "{:.0f} %")),
        "efficiency weak": summary["efficiency_weak"].map(lambda v: _num(100 * v, "{:.0f} %")),
        "MFU %": summary["mfu_pct"].map(lambda v: _num(v, "{:.1f}")),
        "parity vs single": summary.apply(parity_cell, axis=1),
        "loss last": summary["loss_last"].map(lambda v: _num(v, "{:.4f}")),
        "Δ loss vs single": summary["loss_diff_vs_single"].map(lambda v: _num(v, "{:+.1e}")),
        "error": summary["error"].map(_short),
    }
    table = pd.DataFrame(cols)
    if summary.loc[summary["samples_per_s"].notna(), "machine"].nunique() <= 1:
        table = table.drop(columns="machine")
    if (summary["devices"] == summary["world_size"]).all():
        table = table.drop(columns="devices")
    if summary["layout"].str.endswith("×1×1").all():  # data parallel only: the ranks column says it all
        table = table.drop(columns="dp×tp×pp")
    return table.loc[:, [c for c in table.columns if (table[c] != "").any()]]


CONSOLE_COLUMNS = [
    "model",
    "strategy",
    "ranks",
    "global batch",
    "variant",
    "machine",
    "status",
    "samples/s mean [95% CI]",
    "step ms p50",
    "peak mem MB",
    "speedup",
    "efficiency strong",
    "efficiency weak",
]


def console_display(table: pd.DataFrame) -> pd.DataFrame:
    """The terminal's narrower cut of `summary_display` (errors are printed below it)."""
    return table.loc[:, [c for c in CONSOLE_COLUMNS if c in table.columns]]


def verdict_display(verdicts: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "configuration": verdicts["label"],
            "baseline samples/s": verdicts.apply(lambda r: _median_mad(r, "baseline"), axis=1),
            "candidate samples/s": verdicts.apply(lambda r: _median_mad(r, "candidate"), axis=1),
            "change": verdicts["change_pct"].map(lambda v: _num(v, "{:+.1f} %")),
            "tolerance": verdicts["tolerance_pct"].map(lambda v: _num(v, "±{:.1f} %")),
            "peak mem change": verdicts["mem_change_pct"].map(lambda v: _num(v, "{:+.1f} %")),
            "verdict": verdicts["verdict"],
            "reason": verdicts["reason"].map(_short),
        }
    )


def _median_mad(line: pd.Series, side: str) -> str:
    median = line[f"{side}_samples_per_s"]
    if math.isnan(median):
        return f"– ({line[f'{side}_runs']} run(s), none ok)" if line[f"{side}_runs"] else "–"
    return f"{median:,.1f} ± {line[f'{side}_mad']:,.1f} MAD (n={line[f'{side}_ok']})"


def html_list(items: list[str]) -> str:
    return "<ul class='findings'>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>"


def markdown_table(table: pd.DataFrame) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def row_class(table: pd.DataFrame, row: tuple) -> str:
    """bad (failed, regression...), skip (skipped, missing...), good (improvement) or ''."""
    values = dict(zip(table.columns, row, strict=True))
    state = str(values.get("status") or values.get("verdict") or "")
    if state.startswith(("failed", "regression", "oom", "timeout", "interrupted")) or ", failed" in state:
        return "bad"
    if state in ("skipped", "missing", "not comparable"):
        return "skip"
    return "good" if state == "improvement" else ""


def html_table(table: pd.DataFrame, notes: list[str] | None = None) -> str:
    """The table as HTML: numbers right-aligned, text left-aligned, each on one line but for free text
    (WRAPPING_COLUMNS), which wraps.

    `notes` (one per row, "" for none; e.g. a failed configuration's error) are numbered and listed below
    the table; a row's status cell links to its note and shows it on hover, so no long text widens the table.
    """
    notes = notes or [""] * len(table)
    classes = {column: _cell_class(column) for column in table.columns}
    head = "".join(f'<th class="{classes[c]}">{_breakable(str(c))}</th>' for c in table.columns)
    rows, listed = [], []
    for row, note in zip(table.itertuples(index=False), notes, strict=True):
        cells = []
        for column, value in zip(table.columns, row, strict=True):
            attributes = f' class="{classes[column]}"'
            text = html.escape(str(value))
            if note and column == "status":
                listed.append(note)
                attributes += f' title="{html.escape(note)}"'
                text += f"<sup><a href='#note-{len(listed)}'>{len(listed)}</a></sup>"
            cells.append(f"<td{attributes}>{text}</td>")
        rows.append(f'<tr class="{row_class(table, row)}">{"".join(cells)}</tr>')
    items = "".join(f"<li id='note-{i}'>{html.escape(note)}</li>" for i, note in enumerate(listed, start=1))
    below = f"<ol class='notes'>{items}</ol>" if listed else ""
    table_html = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    # a table still wider than the window (many varying columns) scrolls by itself, not the whole page
    return f"<div class='wide'>{table_html}</div>{below}"


def _cell_class(column: str) -> str:
    """`number` (right-aligned, one line), `text` (left-aligned, one line) or `text wrap` (free text)."""
    if column in WRAPPING_COLUMNS:
        return "text wrap"
    return "text" if column in TEXT_COLUMNS else "number"


def _breakable(header: str) -> str:
    """A header such as `batch/replica` may break after its slash (the column need not be that wide)."""
    return re.sub(r"(?<=[a-z]{3}/)(?=[a-z]{3})", "<wbr>", html.escape(header))


TEXT_COLUMNS = {"model", "strategy", "variant", "machine", "status", "error", "verdict", "reason", "configuration"}
WRAPPING_COLUMNS = {"variant", "machine", "status", "error", "reason"}  # free text; the rest stays on one line
RICH_STYLES = {"bad": "red", "skip": "dim", "good": "green", "": None}


def rich_table(table: pd.DataFrame, title: str) -> Table:
    out = Table(title=title, title_justify="left")
    for column in table.columns:
        out.add_column(column, justify="left" if column in TEXT_COLUMNS else "right", overflow="fold")
    for row in table.itertuples(index=False):
        out.add_row(*(str(v) for v in row), style=RICH_STYLES[row_class(table, row)])
    return out


def print_table(table: pd.DataFrame, title: str, console: Console | None = None) -> None:
    (console or Console()).print(rich_table(table, title))


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0 0.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.4em; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; white-space: normal; vertical-align: bottom; }
.text { text-align: left; } td.wrap { white-space: normal; }
tr.bad td { background: #fde2e2; } tr.skip td { color: #888; } tr.good td { background: #e4f6e4; }
sup a { text-decoration: none; padding-left: 0.15em; } ol.notes { font-size: 0.85em; margin-top: 0; }
div.wide { overflow-x: auto; }
figure { margin: 2em 0; } img { max-width: 100%; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 0 0.2em; }
ul.findings { max-width: 70em; line-height: 1.45; } ul.findings li { margin-bottom: 0.4em; }
"""


def index_html(title: str, sources: list[str], sections: list[tuple[str, str]], plots: list[str]) -> str:
    """A standalone page: the sections (findings and tables, already HTML) and the plots (SVG, PNG and data CSV
    beside)."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        "<p>From " + ", ".join(f"<code>{html.escape(s)}</code>" for s in sources) + "</p>",
    ]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    if plots:
        parts.append("<h2>Plots</h2>")
    for name in plots:
        stem = html.escape(Path(name).stem)
        parts.append(
            f"<figure><img src='{stem}.svg' alt='{stem}'><figcaption>{stem}: "
            f"<a href='{stem}.png'>PNG</a> · <a href='{stem}.svg'>SVG</a> · <a href='{stem}.csv'>data</a>"
            "</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
