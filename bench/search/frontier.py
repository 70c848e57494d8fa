"""The largest batch per replica that fits, found by real runs: start where the prediction puts it, double or
halve until one run fits and one runs out of memory, then bisect between them. Pure: `probe(batch)` runs one
and says whether it fit, so the search is tested without running anything."""

from __future__ import annotations

from collections.abc import Callable


def find_frontier(probe: Callable[[int], bool | None], start: int, unit: int, max_batch: int,
                  max_probes: int) -> dict:
    """{fits: the largest batch seen to fit, oom: the smallest seen not to, probes: [(batch, fit)]}; batches are
    multiples of `unit` up to `max_batch`. `probe` returns None for a run that neither fit nor ran out of
    memory (it failed otherwise): the search stops there."""
    fits, oom, probes = None, None, []

    def run(batch: int) -> bool | None:
        result = probe(batch)
        probes.append((batch, result))
        return result

    batch = max(unit, min(max_batch, start // unit * unit))
    while len(probes) < max_probes:
        result = run(batch)
        if result is None:
            break
        if result:
            fits = batch
        else:
            oom = batch
        if oom is None:  # no ceiling yet: double
            if batch >= max_batch:
                break
            batch = min(max_batch, batch * 2)
        elif fits is None:  # no floor yet: halve
            if batch <= unit:
                break
            batch = max(unit, batch // 2 // unit * unit)
        else:  # bisect
            batch = (fits + oom) // 2 // unit * unit
            if batch <= fits:
                break
    return {"fits": fits, "oom": oom, "probes": probes}
