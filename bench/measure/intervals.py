"""Sets of time intervals as sorted, disjoint (start, end) lists: the arithmetic of a step's time breakdown.

Pure Python, in whatever unit the caller uses (bench passes microseconds, the profiler's).
"""

from __future__ import annotations

Intervals = list[tuple[float, float]]


def union(spans) -> Intervals:
    """The disjoint, sorted cover of any (start, end) pairs; empty and inverted pairs are dropped."""
    merged: Intervals = []
    for start, end in sorted((s, e) for s, e in spans if e > s):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(spans: Intervals) -> float:
    return sum(end - start for start, end in spans)


def intersect(a: Intervals, b: Intervals) -> Intervals:
    """Where both disjoint sets are: a two-pointer walk over the sorted lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if end > start:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Intervals, b: Intervals) -> Intervals:
    """Where `a` is and `b` is not (both disjoint and sorted)."""
    out, j = [], 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k, cursor = j, start
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                out.append((cursor, b[k][0]))
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


def clip(spans: Intervals, window: tuple[float, float]) -> Intervals:
    return intersect(spans, [window])
