"""`python -m bench.comm [overrides]`: the collectives micro-benchmark, launched like a benchmark run.

all_reduce, all_gather, reduce_scatter, broadcast and all_to_all over message sizes (powers of two from
`comm.min_bytes` to `comm.max_bytes`), with the launchers of `python -m bench` (local, multinode, slurm,
inline). One row per collective x size is appended to `<results_dir>/comm.jsonl` (in a sweep: the sweep
folder's); the run folder gets `comm.csv` and `busbw_<collective>.png`.
"""

from bench.launch import quiet_controller_logs

quiet_controller_logs()  # before torch loads: see its docstring

from bench import app  # noqa: E402
from bench.comm import controller  # noqa: E402
from bench.comm.output import print_rows  # noqa: E402

COMMAND = app.Command(
    name="bench.comm",
    config_name="comm",
    results_file="comm.jsonl",
    run_name="comm",
    prepare=controller.prepare,
    run=controller.run_collectives,
    empty_row=controller.empty_row,
    print_summary=print_rows,
)


def main() -> None:
    app.main(COMMAND)


if __name__ == "__main__":
    main()
