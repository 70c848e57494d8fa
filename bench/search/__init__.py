"""`python -m bench.search`: the best layouts of `bench.plan` run for real, and each strategy's memory frontier."""
