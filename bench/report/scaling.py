"""Speedup and scaling efficiency of each configuration against its 1-device baseline.

X is a configuration's median samples/s over its ok repeats, N its number of devices (the world size; for
nn.DataParallel, the devices of its one rank), G its global batch, b = G / dp its batch per data-parallel
replica. The baseline X_1 is an ok configuration on 1 device, on the same machine, that differs at most in
strategy (options and parallel degrees included), launch and global batch (same model, data, optimiser,
steps, precision...): the `single` strategy when there is one, else the same strategy on 1 device.

- Strong scaling (bench's default: the global batch is fixed): X_1 has the same global batch G.
      speedup = X_N / X_1,   efficiency_strong = X_N / (N * X_1)
- Weak scaling (the batch per replica is fixed, the global batch grows with N): X_1 has global batch b.
      efficiency_weak = X_N / (N * X_1)     (= T_1 / T_N in step time for pure data parallelism)

Which applies is read off the rows: a configuration gets a strong figure when a 1-device run with the same
global batch exists, a weak figure (N > 1) when one with global batch b exists, both when a sweep holds both
(e.g. `global_batch=32,64 launch.nproc=1,2`). `scaling` names what was found for N > 1; a 1-device
configuration still gets its speedup against `single` (e.g. DDP's overhead on one rank).

loss_diff_vs_single = final loss minus the `single` baseline's final loss (same model, same global batch):
near 0 when a strategy trains the same model as one device does.
"""

from __future__ import annotations

import pandas as pd

STRONG = "strong"
WEAK = "weak"


def add_scaling(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with speedup, efficiency_strong, efficiency_weak, scaling, the baselines used and
    loss_diff_vs_single."""
    out = summary.copy()
    nan = float("nan")
    for column in ("speedup", "efficiency_strong", "efficiency_weak", "loss_diff_vs_single"):
        out[column] = nan
    for column in ("scaling", "baseline_strong", "baseline_weak"):
        out[column] = ""
    for index, line in out.iterrows():
        x = line["samples_per_s"]
        if pd.isna(x):
            continue
        n = int(line["devices"])
        kinds = []
        strong = baseline(out, line, line["global_batch"])
        if strong is not None:
            x1 = out.at[strong, "samples_per_s"]
            out.at[index, "speedup"] = x / x1
            out.at[index, "efficiency_strong"] = x / (n * x1)
            out.at[index, "baseline_strong"] = label(out.loc[strong])
            if out.at[strong, "strategy"] == "single":
                out.at[index, "loss_diff_vs_single"] = line["loss_last"] - out.at[strong, "loss_last"]
            if n > 1:
                kinds.append(STRONG)
        # weak scaling needs the global batch to grow with N: with one replica (tensor, pipeline) a fixed
        # batch per replica is a fixed global batch, which is strong scaling
        grows = n > 1 and line["global_batch"] != line["batch_per_replica"]
        weak = baseline(out, line, line["batch_per_replica"]) if grows else None
        if weak is not None:
            out.at[index, "efficiency_weak"] = x / (n * out.at[weak, "samples_per_s"])
            out.at[index, "baseline_weak"] = label(out.loc[weak])
            kinds.append(WEAK)
        out.at[index, "scaling"] = ", ".join(kinds)
    return out


def baseline(summary: pd.DataFrame, line: pd.Series, global_batch: float):
    """Index of the 1-device baseline for `line` with `global_batch`, or None."""
    candidates = summary[
        (summary["devices"] == 1)
        & (summary["scaling_id"] == line["scaling_id"])
        & (summary["machine"] == line["machine"])
        & (summary["global_batch"] == global_batch)
        & summary["samples_per_s"].notna()
    ]
    for pick in (candidates["strategy"] == "single", candidates["strategy_id"] == line["strategy_id"]):
        chosen = candidates[pick]
        if len(chosen):
            return chosen.index[0]
    return None


def label(line: pd.Series) -> str:
    return f"{line['strategy']}, 1 device, G={line['global_batch']}"


def series(summary: pd.DataFrame, kind: str) -> list[tuple[tuple, pd.DataFrame]]:
    """Scaling series of ok configurations, each sorted by devices.

    strong: same scaling_id, machine, strategy (with options) and global batch, over N;
    weak: same scaling_id, machine, strategy and batch per replica, over more than one N.
    The key is (scaling_id, machine, strategy, batch) where batch is G (strong) or b (weak).
    """
    ok = summary[summary["samples_per_s"].notna()]
    batch = "global_batch" if kind == STRONG else "batch_per_replica"
    found = []
    for key, group in ok.groupby(["scaling_id", "machine", "strategy_id", batch], sort=False):
        # two layouts on the same N (say tp=2 and dp=2 on 2 ranks) are two series; one layout per N is one
        parts = [group] if group["devices"].is_unique else [g for _, g in group.groupby("layout", sort=False)]
        for part in parts:
            if kind == WEAK and (part["devices"].nunique() < 2 or part["global_batch"].nunique() < 2):
                continue
            found.append(((key[0], key[1], part["strategy"].iloc[0], key[3]), part.sort_values("devices")))
    return found
