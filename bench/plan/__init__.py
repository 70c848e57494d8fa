"""Predictions of what a run needs before it runs (`memory`: each rank's memory, without allocating the model)."""
