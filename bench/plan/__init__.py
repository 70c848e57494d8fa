"""Predictions of what a run needs before it runs: each rank's memory (`memory`, without allocating the
model), the step's collectives (`collectives`) and time (`steptime`, over a `network`), for every layout
(`layouts`), a pipeline's ranks (`pipeline`); `python -m bench.plan` prints them and draws their projection
(`projection`), `python -m bench.plan.check` sets them beside the runs measured (`check`)."""
