"""What a collectives run leaves beside its rows: `comm.csv`, a busbw-vs-size plot per collective, and the
table printed at the end."""

from __future__ import annotations

import csv
from pathlib import Path

CSV_COLUMNS = "collective variant size_bytes count time_us time_us_min_rank algbw_gbps busbw_gbps busbw_factor".split()


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        out.writeheader()
        out.writerows(rows)


def plot_busbw(run_dir: Path, rows: list[dict]) -> list[Path]:
    """busbw vs message size, one PNG per collective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    first = rows[0]
    for collective in dict.fromkeys(r["collective"] for r in rows):
        points = sorted((r["size_bytes"], r["busbw_gbps"]) for r in rows if r["collective"] == collective)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(f"{collective}: {first['world_size']} ranks, {first['backend']} on {first['device']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = run_dir / f"busbw_{collective}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:g} {unit}"
        size /= 1024
    return str(size)


def print_rows(rows: list[dict], results_file: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    measured = [r for r in rows if r["status"] == "ok"]
    first = rows[0]
    if measured:
        collectives = list(dict.fromkeys(r["collective"] for r in measured))
        table = Table(
            title=f"bench.comm {first['run_id']}: busbw GB/s, {first['world_size']} ranks, {first['backend']} "
            f"on {first['device_name']}",
            title_justify="left",
        )
        table.add_column("size", justify="right")
        for c in collectives:
            table.add_column(c, justify="right")
        by_key = {(r["collective"], r["size_bytes"]): r for r in measured}
        for size in sorted({r["size_bytes"] for r in measured}):
            cells = [f"{by_key[(c, size)]['busbw_gbps']:.3f}" if (c, size) in by_key else "-" for c in collectives]
            table.add_row(_human(size), *cells)
        console.print(table)
    for r in rows:
        if r["status"] != "ok":
            label = f"{r['status']}{' ' + r['collective'] if r['collective'] else ''}"
            console.print(f"[red]{label}:[/red] ", end="")
            console.print(r["error"], markup=False)
    for warning in dict.fromkeys(w for r in rows for w in r["warnings"]):
        console.print("[yellow]warning:[/yellow] ", end="")
        console.print(warning, markup=False)
    console.print(f"run folder: {first['run_dir']}\n{len(rows)} rows appended to: {results_file}")
