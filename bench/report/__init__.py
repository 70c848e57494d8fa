"""`python -m bench.report`: summary tables, plots and a baseline-vs-candidate regression verdict.

Modules, one job each: `load` (runs.jsonl rows, steps.csv, configuration ids), `table` (repeats pooled
into one line per configuration), `scaling` (speedup, strong and weak efficiency), `labels` (how a
configuration is named in figures and verdicts), `figure_data` (each figure's data as a DataFrame, no
matplotlib), `draw_panels`, `draw_bars` and `draw_style` (drawing those frames), `plots` (data + drawing =
a `Plot`, and saving it), `compare` (the regression rule), `render` (Markdown/HTML/terminal tables),
`output` (the report folder) and `cli` (the command line).
"""
