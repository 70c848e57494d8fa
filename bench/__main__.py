"""`python -m bench [overrides]`: the training benchmark. Composes a config from conf/, launches its ranks and
appends one row per run to `<results_dir>/runs.jsonl` (in a sweep, `-m`: to the sweep folder's)."""

from bench.launch import quiet_controller_logs

quiet_controller_logs()  # before torch loads: see its docstring

from bench import app, controller  # noqa: E402

COMMAND = app.Command(
    name="bench",
    config_name="config",
    results_file="runs.jsonl",
    run_name="${strategy.name}_${model.name}",
    prepare=controller.prepare,
    run=controller.run_benchmark,
    empty_row=controller.empty_row,
    print_summary=controller.print_rows,
)


def main() -> None:
    app.main(COMMAND)


if __name__ == "__main__":
    main()
