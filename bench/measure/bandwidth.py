"""Bandwidths of a collective as nccl-tests define them (its PERFORMANCE.md), in GB/s (1e9 bytes/s):

    algbw = size_bytes / time,   busbw = algbw * factor,
    factor: all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all (n-1)/n; broadcast 1,

where `size_bytes` is nccl-tests' size (the whole buffer: all_gather's gathered output, reduce_scatter's input,
what each rank sends in all_to_all), `time` the time of one call (max over ranks) and n the ranks. busbw is
comparable across collectives and world sizes: it is what the busiest link carries.
"""

from __future__ import annotations


def busbw_factor(collective: str, n: int) -> float:
    """nccl-tests' bus bandwidth factor: busbw = algbw * factor."""
    if collective == "all_reduce":
        return 2 * (n - 1) / n
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if collective == "broadcast":
        return 1.0
    raise ValueError(f"unknown collective {collective!r}")


def bandwidths(collective: str, size_bytes: int, seconds: float, n: int) -> dict:
    algbw = size_bytes / seconds / 1e9
    factor = busbw_factor(collective, n)
    return {"algbw_gbps": algbw, "busbw_gbps": algbw * factor, "busbw_factor": factor}
