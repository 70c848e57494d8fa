"""The planner: what a run needs, predicted before it runs, for every layout of every strategy.

- `setup`: what a plan is made for (the config, the planner's keys, the network, the device), composed once.
- `layouts`: each strategy's layouts (its `layouts` hook) as the runs `python -m bench` would make of them.
- `memory`: each rank's memory, as the strategy's `memory` hook says to predict it (`pipeline`: a pipeline's
  ranks; `collectives`: the collectives a simulated step runs).
- `formula` (a priori step time), `throughput` (a rank's TFLOP/s, and the measured runs the plan reads),
  `calibration` (what the strategy's own measured runs say of the formula), over a `network`.
- `table`: the plan itself (`make_plan`), `projection`: its figure, `check`: its predictions beside the runs
  measured. `python -m bench.plan` prints it, `python -m bench.plan.check` checks it.
"""
