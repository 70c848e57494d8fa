"""`python -m bench.report RESULTS... [--baseline BASELINE...]`: tables, plots and a regression verdict.

RESULTS and BASELINE are runs.jsonl files or folders holding one (a sweep folder, a results_dir).
Prints, and puts first in summary.md and index.html, a sentence per objective (fastest, least memory, best
MFU) saying which configuration is best and why (`findings`).
Writes into --out (default: `<folder of the first RESULTS>/report/`):
  summary.csv, summary.md        one line per configuration (repeats pooled; failed/skipped listed, not counted)
  <plot>.png/.svg/.csv           throughput, scaling_efficiency, peak_memory, sequence, step_time, loss,
                                 breakdown, time_breakdown: those with data (no efficiency without a
                                 1-device run, no sequence without two sequence lengths)
  verdict.csv, verdict.md        with --baseline: the verdict per configuration (+ comparison.png/.svg/.csv)
  index.html                     everything on one page
Exit status: 0; 1 when --baseline is given and a configuration regressed; 2 on bad input or when the two
sides ran on different hardware (unless --allow-different-hardware).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from bench.report import compare, plots, render
from bench.report.findings import Finding, findings
from bench.report.load import ReportError, load_rows, load_run_folder_rows, runs_file
from bench.report.output import IN_SHORT, where, write_report
from bench.report.scaling import add_scaling
from bench.report.table import runs_frame, summarize
from bench.results import folder_problem


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Summarise bench results (tables + plots); with --baseline, judge regressions.",
        epilog="Regression rule: see `python -c 'import bench.report.compare as c; help(c)'` or docs/reports.md.",
    )
    parser.add_argument("results", nargs="+", help="runs.jsonl file(s) or folder(s) holding one (the candidate)")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="PATH",
        help="runs.jsonl or folder to compare against (repeat the flag to pool several)",
    )
    parser.add_argument("--out", type=Path, help="report folder (default: <first results folder>/report)")
    parser.add_argument(
        "--k",
        type=float,
        default=compare.Thresholds.k,
        help="noise multiplier: regression when median drops by more than k·(MAD_b + MAD_c) (default %(default)s)",
    )
    parser.add_argument(
        "--min-rel",
        type=float,
        default=compare.Thresholds.min_rel,
        help="smallest relative throughput drop that counts (default %(default)s = 2 %%)",
    )
    parser.add_argument(
        "--mem-tol",
        type=float,
        default=compare.Thresholds.mem_tol,
        help="relative peak-memory growth allowed (default %(default)s = 10 %%)",
    )
    parser.add_argument(
        "--allow-different-hardware",
        action="store_true",
        help="compare even when device_name or host differ between the two sides",
    )
    parser.add_argument("--no-plots", action="store_true", help="tables and verdict only")
    parser.add_argument(
        "--from-run-folders",
        action="store_true",
        help="read each run's own row.json under the folders instead of their runs.jsonl (a results file on a "
        "shared filesystem where file locks do not hold across machines)",
    )
    args = parser.parse_args(argv)
    for name in ("k", "min_rel", "mem_tol"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    args = parse_args(argv)
    console = console or Console()
    errors = Console(stderr=True)
    try:
        load = load_run_folder_rows if args.from_run_folders else load_rows
        rows, warnings = load(args.results)
        base_rows, more = load(args.baseline) if args.baseline else ([], [])
        sources = [str(p) if args.from_run_folders else str(runs_file(p)) for p in args.results]
        # Both sides in one frame, so a configuration gets the same label (its varying keys) on each.
        both = runs_frame(rows + base_rows)
        candidate, baseline = both.iloc[: len(rows)], both.iloc[len(rows) :]
        if args.baseline and not args.allow_different_hardware:
            compare.check_hardware(baseline, candidate)
        out = args.out or Path(sources[0]).parent / "report"
        if args.from_run_folders and not args.out:
            out = Path(args.results[0]) / "report"
        problem = folder_problem(str(out))
        if problem:
            raise ReportError(f"--out: expected a folder the report can be written to, got {str(out)!r}: {problem}")
    except (ReportError, compare.HardwareMismatch) as exc:
        errors.print(f"[red]bench.report:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    for warning in warnings + more:
        errors.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)

    runs = runs_frame(rows) if args.baseline else candidate  # the table lists what varies within the candidate
    summary = add_scaling(summarize(runs))
    in_short = findings(summary)
    show_summary(summary, runs, in_short, console)
    figures = [] if args.no_plots else plots.report_figures(summary, runs)
    verdicts, thresholds = None, compare.Thresholds(k=args.k, min_rel=args.min_rel, mem_tol=args.mem_tol)
    if args.baseline:
        verdicts = compare.compare(baseline, candidate, thresholds)
        render.print_table(render.verdict_display(verdicts), "regression verdict (candidate vs baseline)", console)
        if not args.no_plots:
            figures.append(plots.comparison_figure(verdicts))
    figures = [f for f in figures if f is not None]
    baseline_sources = [str(p) if args.from_run_folders else str(runs_file(p)) for p in args.baseline]
    written = write_report(out, summary, runs, sources, figures, in_short, verdicts, thresholds, baseline_sources)
    show_written(written, console)

    if verdicts is None:
        return 0
    if compare.regressed(verdicts):
        n = int((verdicts["verdict"] == compare.REGRESSION).sum())
        console.print(f"[red]REGRESSION[/red] in {n} configuration(s) (rule: {compare.rule(thresholds)})")
        return 1
    console.print("[green]no regression[/green]")
    return 0


def show_summary(summary, runs, in_short: list[Finding], console: Console) -> None:
    """The findings first (the answer), then the table and the errors."""
    if in_short:
        console.print(f"[bold]{IN_SHORT}[/bold]")
        for finding in in_short:
            console.print(f"- {finding.text}", markup=False, highlight=False, soft_wrap=True)
        console.print()
    table = render.console_display(render.summary_display(summary))
    render.print_table(table, f"bench: {len(runs)} runs, {len(summary)} configurations", console)
    for _, line in summary[summary["error"] != ""].iterrows():
        console.print(f"{escape(where(line))} [red]({escape(line['status'])})[/red]: ", end="", highlight=False)
        console.print(line["error"], markup=False, highlight=False, soft_wrap=True)


def show_written(written: list[Path], console: Console) -> None:
    """The report's files, one line per artefact: a plot's .png stands for its .svg and data .csv."""
    console.print(f"report written to {written[0].parent}/", highlight=False, soft_wrap=True)
    stems = [p.stem for p in written if p.suffix == ".png"]
    for path in written:
        if path.stem in stems and path.suffix != ".png":
            continue
        extra = "  (+ .svg, .csv with the data drawn)" if path.stem in stems else ""
        console.print(f"  {path}{extra}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
