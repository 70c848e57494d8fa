"""How a configuration is named in the figures and in the verdict: its strategy, ranks and global batch,
plus whatever else varies in the frame it is shown with (the model, the variant, the machine)."""

from __future__ import annotations

import pandas as pd


def ok_lines(frame: pd.DataFrame) -> pd.DataFrame:
    """The lines with a measured throughput (summary lines with an ok run, or ok runs)."""
    return frame[frame["samples_per_s"].notna()]


def several_machines(frame: pd.DataFrame) -> bool:
    """Whether the ok lines ran on more than one machine (then labels name it)."""
    return ok_lines(frame)["machine"].nunique() > 1


def config_label(line: pd.Series, frame: pd.DataFrame) -> str:
    """e.g. `ddp · 2 ranks · G=64`, prefixed by the model and suffixed by the layout (dp×tp×pp), the variant
    and the machine when they vary: each configuration in `frame` gets a label of its own."""
    n = int(line["world_size"])
    parts = [line["strategy"], f"{n} rank" + ("s" if n > 1 else ""), f"G={line['global_batch']}"]
    if line["devices"] != n:
        parts.insert(2, f"{line['devices']} devices")
    alike = frame[(frame["strategy"] == line["strategy"]) & (frame["world_size"] == n)]
    if alike.loc[alike["global_batch"] == line["global_batch"], "layout"].nunique() > 1:
        parts.append(line["layout"])  # e.g. fsdp with parallel.tp=1 and 2 on the same ranks
    if frame["model"].nunique() > 1:
        parts.insert(0, line["model"])
    if line["variant"]:
        parts.append(line["variant"])
    if several_machines(frame):
        parts.append(str(line["machine"]))
    return " · ".join(parts)


def panel_title(line: pd.Series, frame: pd.DataFrame) -> str:
    """A scaling panel: the model, and whatever else distinguishes it from the other panels."""
    extra = [p for p in line["variant"].split(", ") if p and not p.startswith(("launch.", "strategy."))]
    if several_machines(frame):
        extra.append(str(line["machine"]))
    return line["model"] + (f" ({', '.join(extra)})" if extra else "")
