"""One row per run (`runs_frame`) and one row per configuration with its repeats pooled (`summarize`).

Only `ok` runs contribute numbers. Failed, skipped (and any other non-ok) runs stay in the table: a
configuration with no ok run shows its status and first error with empty numbers; one with some ok
repeats shows how many of its runs failed.

Over the ok repeats of a configuration: `samples_per_s` is the median, with mean, sample standard
deviation (n-1; empty for one run), MAD (median absolute deviation from the median), min and max beside
it. The other numbers (step-time percentiles, peak memory, MFU, loss, a pipeline's bubble) are medians over
repeats; what MFU was counted by (flops_convention, peak_source) is the first ok run's.
"""

from __future__ import annotations

import math
import statistics

import pandas as pd

from bench.measure.stats import confidence_interval_95
from bench.report.load import config_id, config_items, number, run_dir, scaling_id, strategy_id
from bench.results import RUN_NUMBERS

# Config keys already shown in their own column (parallel.*: the layout), so never listed as the "variant".
SHOWN_KEYS = {"model.name", "strategy.name", "launch.nproc", "launch.nnodes", "global_batch", "device"}
SHOWN_PREFIXES = ("parallel.",)

# Medians over repeats (samples_per_s gets the fuller treatment in `_throughput_stats`).
# bubble_fraction: a pipeline's predicted idle share of its schedule, from the row's strategy_facts.
MEDIAN_COLUMNS = [c for c in RUN_NUMBERS if c not in ("samples_per_s", "step_time_ms_std", "loss_first")]
MEDIAN_COLUMNS += ["bubble_fraction"]
# What a number was measured by, the same for every repeat: taken from the first ok run.
CONVENTION_COLUMNS = ["flops_convention", "peak_source"]

GROUP_COLUMNS = [
    "model",
    "strategy",
    "world_size",
    "devices",
    "global_batch",
    "batch_per_replica",
    "layout",
    "seq_len",
    "cp",
    "variant",
    "device_name",
    "host",
    "machine",
]


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """One line per run: identity, status, the numbers and the keys that group runs. `device` is what the
    run asked for (cpu, cuda; `auto` in a skipped row), `run_dir` the run's folder as found now (None when
    it is gone, see `load.run_dir`)."""
    varying = _varying_keys(rows)
    records = []
    for row in rows:
        items = config_items(row)
        world = _whole(row.get("world_size"))
        devices = _whole(row.get("devices")) or world  # nn.DataParallel: one rank, several devices
        batch = _whole(row.get("global_batch"))
        missing = row.get("_missing") or []
        folder = run_dir(row.get("run_dir"), row.get("run_id"), row.get("_runs_file"))
        records.append(
            {
                "config_id": config_id(row),
                "scaling_id": scaling_id(row),
                "strategy_id": strategy_id(row),
                "model": row.get("model"),
                "strategy": row.get("strategy"),
                "world_size": world,
                "devices": devices,
                "global_batch": batch,
                "batch_per_replica": (batch / (data_parallel(items, world) * max(1, devices // world))
                                      if batch is not None and world else math.nan),
                "layout": layout(items, world) if world else "",
                "seq_len": _whole(row.get("seq_len")) or _whole(items.get("model.seq_len")),
                "cp": _context(items),
                "variant": ", ".join(f"{k}={items[k]}" for k in varying if k in items),
                "device_name": row.get("device_name"),
                "host": row.get("host"),
                "status": "incomplete" if missing else row["status"],
                "error": f"the row lacks {', '.join(missing)}" if missing else row.get("error"),
                "parity_ok": row.get("parity_ok"),
                "run_id": row.get("run_id"),
                "started_at": row.get("started_at"),
                "device": row.get("device"),
                "run_dir": None if folder is None else str(folder),
                **{key: number(row.get(key)) for key in RUN_NUMBERS},
                "bubble_fraction": number(_strategy_facts(row).get("bubble_fraction")),
                **{key: _text(row.get(key)) for key in CONVENTION_COLUMNS},
            }
        )
    runs = pd.DataFrame.from_records(records)
    for column in ("world_size", "devices", "global_batch", "seq_len"):
        runs[column] = runs[column].astype("Int64")  # a missing value stays missing, not 0 or 1
    _fill_device_names(runs)
    runs["machine"] = runs["device_name"].astype(str) + " on " + runs["host"].astype(str)
    return runs


def _strategy_facts(row: dict) -> dict:
    facts = row.get("strategy_facts")
    return facts if isinstance(facts, dict) else {}


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def _whole(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def layout(items: dict, world: int) -> str:
    """The parallel degrees over the ranks as `dp×tp×pp`, e.g. `2×1×1` for DDP on 2 ranks; HSDP's dp as
    replicas*shards, `2*2×1×1`; context and expert parallelism after them, `1×1×1 cp2`, `2×1×1 ep2`."""
    dp, tp, pp = degrees(items, world)
    replicate, cp, ep = items.get("parallel.dp_replicate", 1), _context(items), items.get("parallel.ep", 1)
    return "×".join((f"{replicate}*{dp // replicate}" if isinstance(replicate, int) and replicate > 1 else str(dp),
                     str(tp), str(pp))) + (f" cp{cp}" if cp > 1 else "") + (
        f" ep{ep}" if isinstance(ep, int) and ep > 1 else "")


def _context(items: dict) -> int:
    cp = items.get("parallel.cp", 1)
    return cp if isinstance(cp, int) and cp > 0 else 1


def degrees(items: dict, world: int) -> tuple[int, int, int]:
    """(dp, tp, pp) over the ranks. A degree of -1 (at most one, as bench checks) is what the world size
    leaves for it; rows from before parallel degrees existed are pure data parallel."""
    given = [items.get("parallel.dp", -1), items.get("parallel.tp", 1), items.get("parallel.pp", 1)]
    given = [d if isinstance(d, int) else -1 for d in given]
    fixed = math.prod(d for d in given if d > 0) * _context(items)
    dp, tp, pp = (d if d > 0 else max(1, world // fixed) for d in given)
    return dp, tp, pp


def data_parallel(items: dict, world: int) -> int:
    """Data-parallel replicas over the ranks (nn.DataParallel's devices within one rank come on top)."""
    return degrees(items, world)[0]


def _varying_keys(rows: list[dict]) -> list[str]:
    """Config keys, not shown in a column of their own, whose value differs between runs of the same strategy
    and model: they tell configurations apart. Keys that come with a strategy or model choice (such as
    `strategy.bucket_cap_mb`, `model.vocab_size`) are left out: the strategy and model columns say it."""
    by_kind: dict[tuple, list[dict]] = {}
    for row in rows:
        items = config_items(row)
        by_kind.setdefault((items.get("strategy.name"), items.get("model.name")), []).append(items)
    keys = set()
    for group in by_kind.values():
        for key in set().union(*group):
            if len({repr(items.get(key, "<absent>")) for items in group}) > 1:
                keys.add(key)
    return sorted(k for k in keys - SHOWN_KEYS if not k.startswith(SHOWN_PREFIXES))


def _fill_device_names(runs: pd.DataFrame) -> None:
    """A run that measured nothing has no device_name: take the one its configuration's ok runs on the same
    host report, when that is unambiguous, so it is listed with them."""
    known = runs[runs["device_name"].notna()].groupby(["config_id", "host"])["device_name"].unique()
    for index in runs.index[runs["device_name"].isna()]:
        names = known.get((runs.at[index, "config_id"], runs.at[index, "host"]))
        runs.at[index, "device_name"] = names[0] if names is not None and len(names) == 1 else ""


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One line per configuration and machine: repeats pooled, non-ok runs counted but not averaged."""
    lines = []
    for _key, group in runs.groupby(["config_id", "machine"], sort=False, dropna=False):
        ok = group[group["status"] == "ok"]
        # the configuration's identity from an ok run where there is one: an incomplete row of the same config
        # (its world_size missing) listed first left the line's devices empty beside an ok run's throughput
        first = (ok if len(ok) else group).iloc[0]
        line = {column: first[column] for column in GROUP_COLUMNS}
        line.update(
            config_id=first["config_id"],
            scaling_id=first["scaling_id"],
            strategy_id=first["strategy_id"],
            status=_status(group),
            runs=len(group),
            ok_runs=len(ok),
            **_throughput_stats(ok["samples_per_s"].dropna().tolist()),
        )
        for column in MEDIAN_COLUMNS:
            values = ok[column].dropna().tolist()
            line[column] = statistics.median(values) if values else float("nan")
        for column in CONVENTION_COLUMNS:
            stated = ok[column].dropna()
            line[column] = stated.iloc[0] if len(stated) else None
        parity = ok["parity_ok"].dropna()
        line["parity_ok"] = bool(parity.all()) if len(parity) else None
        errors = group.loc[group["status"] != "ok", "error"].dropna()
        line["error"] = errors.iloc[0] if len(errors) else ""
        line["run_ids"] = " ".join(str(r) for r in group["run_id"])
        lines.append(line)
    summary = pd.DataFrame.from_records(lines)
    order = summary["strategy"].map(lambda s: (s != "single", s))
    summary = summary.assign(_order=order).sort_values(
        ["model", "variant", "global_batch", "_order", "world_size"], kind="stable"
    )
    return summary.drop(columns="_order").reset_index(drop=True)


def _status(group: pd.DataFrame) -> str:
    """`ok`, `failed`, `skipped`, or e.g. `ok 2/3, failed 1` for a configuration with mixed outcomes."""
    counts = group["status"].value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    others = ", ".join(f"{status} {n}" for status, n in counts.items() if status != "ok")
    return f"ok {counts.get('ok', 0)}/{len(group)}, {others}"


def _throughput_stats(values: list[float]) -> dict:
    nan = float("nan")
    if not values:
        keys = ("samples_per_s", "samples_per_s_mean", "samples_per_s_std", "samples_per_s_mad")
        more = ("samples_per_s_min", "samples_per_s_max", "samples_per_s_ci95_low", "samples_per_s_ci95_high")
        return dict.fromkeys((*keys, *more), nan)
    median = statistics.median(values)
    low, high = confidence_interval_95(values) or (nan, nan)
    return {
        "samples_per_s": median,
        "samples_per_s_mean": statistics.fmean(values),
        "samples_per_s_std": statistics.stdev(values) if len(values) > 1 else nan,
        "samples_per_s_mad": mad(values),
        "samples_per_s_min": min(values),
        "samples_per_s_max": max(values),
        "samples_per_s_ci95_low": low,
        "samples_per_s_ci95_high": high,
    }


def mad(values: list[float]) -> float:
    """Median absolute deviation from the median (unscaled)."""
    median = statistics.median(values)
    return statistics.median(abs(v - median) for v in values)
