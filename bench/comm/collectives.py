"""The collectives `bench.comm` measures: their buffers, laid out so that each result is known, and the calls
that may run them.

A message of `size` bytes is nccl-tests' size: the whole buffer (all_gather: the gathered output,
reduce_scatter: the input, all_to_all: what each rank sends), split evenly between the ranks where the
collective splits it. Every collective has one or more variants, preferred first: the single-tensor form
(`all_gather_single` / `all_gather_into_tensor`, ...), then the list form a backend may be limited to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
MESSAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}


def message_sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """Powers of two from min_bytes (rounded up to one) to max_bytes."""
    size = 1 << max(0, (min_bytes - 1).bit_length())
    sizes = []
    while size <= max_bytes:
        sizes.append(size)
        size *= 2
    return sizes


def element_count(collective: str, size_bytes: int, elem_size: int, n: int) -> int:
    """Elements of the whole buffer, a multiple of n where the collective splits it between the ranks."""
    count = size_bytes // elem_size
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        count -= count % n
    return count


@dataclass(frozen=True)
class Buffers:
    input: torch.Tensor
    output: torch.Tensor  # the input itself for the in-place collectives (all_reduce, broadcast)
    expected: torch.Tensor  # what `output` holds after one call on freshly built buffers


def buffers(collective: str, count: int, n: int, rank: int, dtype, device) -> Buffers:
    """Rank r contributes r + 1 (all_to_all: 8r + j in the chunk for rank j): small integers, exact in every
    dtype, so that one call's result can be compared exactly."""
    chunk = count // n

    def full(size: int, value: float) -> torch.Tensor:
        return torch.full((size,), float(value), dtype=dtype, device=device)

    total = n * (n + 1) / 2
    if collective == "all_reduce":
        buf = full(count, rank + 1)
        return Buffers(buf, buf, full(count, total))
    if collective == "broadcast":
        buf = full(count, rank + 1)
        return Buffers(buf, buf, full(count, 1))
    if collective == "all_gather":
        gathered = torch.cat([full(chunk, j + 1) for j in range(n)])
        return Buffers(full(chunk, rank + 1), torch.empty_like(gathered), gathered)
    if collective == "reduce_scatter":
        return Buffers(full(count, rank + 1), full(chunk, 0), full(chunk, total))
    if collective == "all_to_all":
        # after the exchange, chunk j of rank r holds what rank j sent it: 8j + r
        sent = torch.cat([full(chunk, 8 * rank + j) for j in range(n)])
        received = torch.cat([full(chunk, 8 * j + rank) for j in range(n)])
        return Buffers(sent, torch.empty_like(sent), received)
    raise ValueError(f"unknown collective {collective!r}")


# A variant binds prepared buffers to a call; list forms split their tensors here, outside the timed loop.
Bind = Callable[[Buffers, int], Callable[[], object]]


def _single_tensor(*names: str) -> tuple[str, Bind]:
    """The first of torch's names for a single-tensor collective that this torch has (`all_gather_single` is
    torch 2.13's name for `all_gather_into_tensor`)."""
    name = next(n for n in names if hasattr(dist, n))
    return name, lambda b, n: partial(getattr(dist, name), b.output, b.input)


def variants(collective: str) -> list[tuple[str, Bind]]:
    """(name, bind) for each way torch offers to run `collective`, preferred first."""
    if collective == "all_reduce":
        return [("all_reduce", lambda b, n: partial(dist.all_reduce, b.output))]
    if collective == "broadcast":
        return [("broadcast", lambda b, n: partial(dist.broadcast, b.output, src=0))]
    if collective == "all_gather":
        return [
            _single_tensor("all_gather_single", "all_gather_into_tensor"),
            ("all_gather", lambda b, n: partial(dist.all_gather, list(b.output.chunk(n)), b.input)),
        ]
    if collective == "reduce_scatter":
        return [
            _single_tensor("reduce_scatter_single", "reduce_scatter_tensor"),
            ("reduce_scatter", lambda b, n: partial(dist.reduce_scatter, b.output, list(b.input.chunk(n)))),
        ]
    if collective == "all_to_all":
        return [
            ("all_to_all_single", lambda b, n: partial(dist.all_to_all_single, b.output, b.input)),
            ("all_to_all", lambda b, n: partial(dist.all_to_all, list(b.output.chunk(n)), list(b.input.chunk(n)))),
        ]
    raise ValueError(f"unknown collective {collective!r}")


def pick_variant(collective: str, n: int, rank: int, dtype, device: str, check: bool) -> tuple[str | None, object]:
    """The first variant the backend runs, tried on a small message: (name, bind); or (None, why none ran).
    With `check`, its result is compared with the expected values (a wrong result is a broken setup)."""
    problems = []
    for name, bind in variants(collective):
        b = buffers(collective, n * 4, n, rank, dtype, device)
        try:
            bind(b, n)()
        except (RuntimeError, NotImplementedError, ValueError) as exc:  # the backend does not implement it
            problems.append(f"{name}: {' '.join(str(exc).split())[:300]}")
            continue
        if check and not torch.equal(b.output, b.expected):
            raise RuntimeError(f"{collective} ({name}) returned wrong values on rank {rank}: the setup is broken")
        return name, bind
    return None, "; ".join(problems)
