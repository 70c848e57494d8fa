"""What every figure shares: a colour per strategy, markers and line styles, the ideal line's look."""

from __future__ import annotations

import pandas as pd

from bench.report.labels import config_label, ok_lines

IDEAL_STYLE = {"color": "0.45", "linestyle": "--", "linewidth": 1.2}
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def strategy_colors(summary: pd.DataFrame) -> dict[str, str]:
    """`single` first, then the other strategies by name, through matplotlib's ten default colours."""
    palette = [f"C{i}" for i in range(10)]
    names = sorted(summary["strategy"].dropna().unique(), key=lambda s: (s != "single", s))
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def label_colors(summary: pd.DataFrame) -> dict[str, str]:
    """Each ok configuration's label (see `labels.config_label`) -> its strategy's colour."""
    colors = strategy_colors(summary)
    return {config_label(line, summary): colors[line["strategy"]] for _, line in ok_lines(summary).iterrows()}


def bar_height(count: int) -> float:
    """Figure height in inches for `count` horizontal bars (or boxes)."""
    return max(2.6, 0.45 * count + 1.4)
