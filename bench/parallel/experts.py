"""Expert parallelism's token exchange (`parallel.ep`): each of ep ranks holds n_experts / ep of a layer's
experts (rank r the r-th run of them); a token goes to the rank holding its expert (`dispatch`) and its output
comes back (`combine`), over all-to-all, the counts exchanged first so that each rank knows what it receives."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist


class Route(NamedTuple):
    """How a rank's tokens were sent: their order, sorted by destination rank, and the counts sent to and received
    from each rank (`combine` sends the outputs back the same way)."""

    order: torch.Tensor
    sent: list[int]
    received: list[int]


def destinations(experts: torch.Tensor, n_experts: int, ep: int) -> tuple[torch.Tensor, list[int]]:
    """(The tokens' order sorted by the rank holding their expert, stable; how many go to each of the ep ranks)
    for `experts`, each token's expert (one entry per token and choice: a top-k router's flattened)."""
    if n_experts % ep:
        raise ValueError(f"{n_experts} experts do not split over {ep} ranks")
    rank_of = torch.div(experts, n_experts // ep, rounding_mode="floor")
    return torch.argsort(rank_of, stable=True), torch.bincount(rank_of, minlength=ep).tolist()


def dispatch(tokens: torch.Tensor, experts: torch.Tensor, n_experts: int, group=None) -> tuple[torch.Tensor,
                                                                                                torch.Tensor, Route]:
    """(The tokens this rank's experts receive, in the order of the ranks that sent them; which of this rank's
    experts each is for, 0 .. n_experts / ep - 1; the route back). `tokens` is [n, ...] and `experts` [n]. The
    counts go first (`all_to_all_single` of one count per rank), then the tokens and their expert ids; the
    tokens' gradients come back the same way in backward."""
    from torch.distributed.nn.functional import all_to_all_single

    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    order, sent = destinations(experts, n_experts, ep)
    counts = torch.tensor(sent, dtype=torch.int64)
    got = torch.empty_like(counts)
    dist.all_to_all_single(got, counts, group=group)
    received = got.tolist()
    out = tokens.new_empty((sum(received), *tokens.shape[1:]))
    arrived = all_to_all_single(out, tokens[order].contiguous(), received, sent, group=group)
    ids = experts.new_empty(sum(received))
    dist.all_to_all_single(ids, experts[order].contiguous(), received, sent, group=group)
    return arrived, ids - rank * (n_experts // ep), Route(order, sent, received)


def combine(outputs: torch.Tensor, route: Route, group=None) -> torch.Tensor:
    """The experts' `outputs` (in the order `dispatch` delivered their tokens) back to the ranks the tokens came
    from, each in its token's own place."""
    from torch.distributed.nn.functional import all_to_all_single

    back = outputs.new_empty((sum(route.sent), *outputs.shape[1:]))
    back = all_to_all_single(back, outputs.contiguous(), route.sent, route.received, group=group)
    return back.new_zeros(back.shape).index_copy(0, route.order, back)
