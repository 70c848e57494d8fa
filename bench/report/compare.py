"""Baseline vs candidate: a verdict per configuration, and whether the candidate regressed.

Configurations are matched by their config (run-specific keys ignored, see `load.config_id`). For a
configuration with ok runs on both sides, with b the baseline's and c the candidate's samples/s over
their ok repeats:

    m_b = median(b),  m_c = median(c),  MAD_x = median(|x_i - m_x|)
    tol = max(k * (MAD_b + MAD_c), min_rel * m_b)
    throughput regression   <=>  m_c < m_b - tol
    improvement             <=>  m_c > m_b + tol          (and no memory regression)
    memory regression       <=>  M_c > (1 + mem_tol) * M_b,  M = median over ok repeats of peak_mem_mb

Reported beside the verdict: ratio = m_c / m_b, its spread ratio * (MAD_b / m_b + MAD_c / m_c), the change
100 * (m_c - m_b) / m_b and the tolerance 100 * tol / m_b, in %.

Defaults: k = 3, min_rel = 0.02, mem_tol = 0.10. `min_rel` keeps single runs (MAD 0) from being flagged
on noise; run repeats (`+repeat=0,1,2`) to let the MAD term speak.

A configuration with ok baseline runs whose candidate runs all failed (or timed out, ran out of memory…)
is a regression too. One missing from the candidate is reported as `missing`, one new in the candidate
as `new`; neither fails the comparison.

Hardware: both sides must report the same device_name and host for every matched configuration; if not,
`HardwareMismatch` is raised (the CLI exits 2) unless `allow_different_hardware`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import pandas as pd

from bench.report.labels import config_label
from bench.report.table import mad

REGRESSION = "regression"
FEW_REPEATS = 3  # below this on either side, the reason says the noise estimate is thin
IMPROVEMENT = "improvement"
NO_CHANGE = "no change"


@dataclass(frozen=True)
class Thresholds:
    k: float = 3.0
    min_rel: float = 0.02
    mem_tol: float = 0.10


def rule(t: Thresholds) -> str:
    """The regression rule with its numbers, for the report's pages."""
    return (
        f"regression when the candidate's median samples/s < baseline median − max(k·(MAD_b + MAD_c), "
        f"min_rel·baseline median) with k = {t.k:g}, min_rel = {t.min_rel:g}; or when its peak memory > "
        f"(1 + {t.mem_tol:g})·baseline; or when it failed where the baseline ran."
    )


class HardwareMismatch(Exception):
    """Baseline and candidate ran on different hardware."""


def hardware(runs: pd.DataFrame) -> dict[str, set]:
    """config_id -> {(device_name, host)} of its ok runs."""
    ok = runs[runs["status"] == "ok"]
    return {cid: set(zip(g["device_name"], g["host"], strict=True)) for cid, g in ok.groupby("config_id")}


def check_hardware(baseline: pd.DataFrame, candidate: pd.DataFrame) -> None:
    base_hw, cand_hw = hardware(baseline), hardware(candidate)
    differ = [cid for cid in base_hw.keys() & cand_hw.keys() if base_hw[cid] != cand_hw[cid]]
    if not differ:
        return
    cid = sorted(differ)[0]
    line = candidate[candidate["config_id"] == cid].iloc[0]

    def show(pairs: set) -> str:
        return ", ".join(f"{d!r} on host {h!r}" for d, h in sorted(pairs, key=str))

    raise HardwareMismatch(
        f"baseline and candidate ran on different hardware ({len(differ)} configuration(s)); e.g. "
        f"{line['model']} {line['strategy']} with {line['world_size']} rank(s): baseline {show(base_hw[cid])}, "
        f"candidate {show(cand_hw[cid])}. Numbers from different machines do not make a regression verdict; "
        f"pass --allow-different-hardware to compare anyway."
    )


def compare(baseline: pd.DataFrame, candidate: pd.DataFrame, thresholds: Thresholds = Thresholds()) -> pd.DataFrame:
    """One line per configuration present on either side (runs frames in, see `table.runs_frame`)."""
    lines = []
    ids = list(dict.fromkeys([*candidate["config_id"], *baseline["config_id"]]))
    both = pd.concat([candidate, baseline])
    for cid in ids:
        base = baseline[baseline["config_id"] == cid]
        cand = candidate[candidate["config_id"] == cid]
        first = (cand if len(cand) else base).iloc[0]
        line = {
            "model": first["model"],
            "strategy": first["strategy"],
            "world_size": first["world_size"],
            "global_batch": first["global_batch"],
            "variant": first["variant"],
            "label": config_label(first, both),
            "config_id": cid,
            **_side("baseline", base),
            **_side("candidate", cand),
        }
        line.update(_verdict(line, base, cand, thresholds))
        lines.append(line)
    return pd.DataFrame.from_records(lines)


def _side(name: str, runs: pd.DataFrame) -> dict:
    ok = runs[runs["status"] == "ok"]
    x = ok["samples_per_s"].dropna().tolist()
    mem = ok["peak_mem_mb"].dropna().tolist()
    return {
        f"{name}_runs": len(runs),
        f"{name}_ok": len(x),
        f"{name}_samples_per_s": statistics.median(x) if x else float("nan"),
        f"{name}_mad": mad(x) if x else float("nan"),
        f"{name}_peak_mem_mb": statistics.median(mem) if mem else float("nan"),
        f"{name}_device": ", ".join(sorted({str(d) for d in ok["device_name"].dropna()})),
    }


def _verdict(line: dict, base: pd.DataFrame, cand: pd.DataFrame, t: Thresholds) -> dict:
    nan = float("nan")
    out = {"ratio": nan, "ratio_spread": nan, "change_pct": nan, "tolerance_pct": nan, "mem_change_pct": nan}
    if not line["baseline_ok"]:
        if line["candidate_ok"]:
            return {**out, "verdict": "new", "reason": "no ok baseline run for this configuration"}
        statuses = sorted({*base["status"], *cand["status"]})
        return {**out, "verdict": "not comparable", "reason": "no ok run on either side: " + ", ".join(statuses)}
    if not len(cand):
        return {**out, "verdict": "missing", "reason": "not run by the candidate"}
    if not line["candidate_ok"]:
        errors = cand["error"].dropna()
        why = f"candidate {', '.join(sorted(set(cand['status'])))}"
        return {**out, "verdict": REGRESSION, "reason": why + (f": {errors.iloc[0]}" if len(errors) else "")}

    m_b, m_c = line["baseline_samples_per_s"], line["candidate_samples_per_s"]
    tol = max(t.k * (line["baseline_mad"] + line["candidate_mad"]), t.min_rel * m_b)
    out["ratio"] = m_c / m_b
    out["ratio_spread"] = out["ratio"] * (line["baseline_mad"] / m_b + line["candidate_mad"] / m_c)
    out["change_pct"] = 100 * (m_c - m_b) / m_b
    out["tolerance_pct"] = 100 * tol / m_b
    reasons = []
    verdict = NO_CHANGE
    if m_c < m_b - tol:
        verdict = REGRESSION
        reasons.append(f"throughput {out['change_pct']:+.1f} % (beyond -{out['tolerance_pct']:.1f} %)")
    elif m_c > m_b + tol:
        verdict = IMPROVEMENT
        reasons.append(f"throughput {out['change_pct']:+.1f} % (beyond +{out['tolerance_pct']:.1f} %)")
    mem_b, mem_c = line["baseline_peak_mem_mb"], line["candidate_peak_mem_mb"]
    if pd.notna(mem_b) and pd.notna(mem_c) and mem_b > 0:
        out["mem_change_pct"] = 100 * (mem_c - mem_b) / mem_b
        if mem_c > (1 + t.mem_tol) * mem_b:
            if verdict != REGRESSION:
                reasons.clear()
            verdict = REGRESSION
            reasons.append(f"peak memory {out['mem_change_pct']:+.1f} % (beyond +{100 * t.mem_tol:.0f} %)")
    if not reasons:
        reasons.append(f"throughput {out['change_pct']:+.1f} % within ±{out['tolerance_pct']:.1f} %")
    if min(line["baseline_ok"], line["candidate_ok"]) < FEW_REPEATS:
        reasons.append(f"only {line['baseline_ok']} vs {line['candidate_ok']} run(s): no noise estimate beyond min_rel")
    return {**out, "verdict": verdict, "reason": "; ".join(reasons)}


def regressed(verdicts: pd.DataFrame) -> bool:
    return bool((verdicts["verdict"] == REGRESSION).any())
