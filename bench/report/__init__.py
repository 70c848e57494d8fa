"""`python -m bench.report`: summary tables, plots and a baseline-vs-candidate regression verdict.

Modules, one job each: `load` (runs.jsonl rows, steps.csv, configuration ids), `table` (repeats pooled
into one line per configuration), `scaling` (speedup, strong and weak efficiency), `plots` (figures and
the data behind them), `compare` (the regression rule), `render` (Markdown/HTML/terminal tables),
`output` (the report folder) and `cli` (the command line).
"""
