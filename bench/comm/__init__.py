"""The collectives micro-benchmark: `python -m bench.comm` (see `bench.comm.__main__`)."""
