"""Expert parallelism's token exchange (`parallel.ep`): each of ep ranks holds n_experts / ep of a layer's
experts (rank r the r-th run of them); a token goes to the rank holding its expert (`dispatch`) and its output
comes back (`combine`), over all-to-all, the counts exchanged first so that each rank knows what it receives."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch._guards import detect_fake_mode


class Route(NamedTuple):
    """How a rank's tokens were sent: their order, sorted by destination rank, and the counts sent to and received
    from each rank (`combine` sends the outputs back the same way); how many chose each expert (None on fake
    tensors, which have no values to count)."""

    order: torch.Tensor
    sent: list[int]
    received: list[int]
    per_expert: list[int] | None = None


def destinations(experts: torch.Tensor, n_experts: int, ep: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """(The tokens' order sorted by the rank holding their expert, stable; how many go to each of the ep ranks;
    how many to each expert) for `experts`, each token's expert (one entry per token and choice: a top-k
    router's flattened). One count read back from the device."""
    if n_experts % ep:
        raise ValueError(f"{n_experts} experts do not split over {ep} ranks")
    per_rank = n_experts // ep
    per_expert = torch.bincount(experts, minlength=n_experts).tolist()
    sent = [sum(per_expert[r * per_rank:(r + 1) * per_rank]) for r in range(ep)]
    return torch.argsort(torch.div(experts, per_rank, rounding_mode="floor"), stable=True), sent, per_expert


def balanced(n: int, parts: int) -> list[int]:
    """`n` split into `parts` counts as even as can be."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def dispatch(tokens: torch.Tensor, experts: torch.Tensor, n_experts: int, group=None) -> tuple[torch.Tensor,
                                                                                                torch.Tensor, Route]:
    """(The tokens this rank's experts receive, in the order of the ranks that sent them; which of this rank's
    experts each is for, 0 .. n_experts / ep - 1; the route back). `tokens` is [n, ...] and `experts` [n]. The
    counts go first (`all_to_all_single` of one count per rank), then the tokens and their expert ids; the
    tokens' gradients come back the same way in backward."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    if detect_fake_mode(tokens) is not None:  # a simulated rank: no values to route by, the tokens spread evenly
        order, sent = torch.arange(len(experts), device=experts.device), balanced(len(experts), ep)
        received, per_expert = sent, None
    else:
        order, sent, per_expert = destinations(experts, n_experts, ep)
        counts = torch.tensor(sent, dtype=torch.int64, device=experts.device)  # NCCL moves device tensors only
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=group)
        received = got.tolist()
    arrived = all_to_all_single_autograd(tokens[order].contiguous(), received, sent, group or dist.group.WORLD)
    ids = experts.new_empty(sum(received))
    dist.all_to_all_single(ids, experts[order].contiguous(), received, sent, group=group)
    return arrived, ids - rank * (n_experts // ep), Route(order, sent, received, per_expert)


def combine(outputs: torch.Tensor, route: Route, group=None) -> torch.Tensor:
    """The experts' `outputs` (in the order `dispatch` delivered their tokens) back to the ranks the tokens came
    from, each in its token's own place."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    back = all_to_all_single_autograd(outputs.contiguous(), route.sent, route.received, group or dist.group.WORLD)
    return back.new_zeros(back.shape).index_copy(0, route.order, back)


# ----------------------------------------------------------------------------- a model's experts, split over ranks


def expert_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules holding a layer's experts as stacked weights, by path: transformers' experts interface
    (`forward(hidden_states, top_k_index, top_k_weights)`, `num_experts`, each weight [num_experts, ...])."""
    return {path: m for path, m in model.named_modules()
            if isinstance(getattr(m, "num_experts", None), int) and hasattr(m, "gate_up_proj")
            and hasattr(m, "down_proj")}


def expert_parallel(model: nn.Module, mesh, tokens: dict) -> None:
    """Split every expert layer of `model` (on the meta device) over the "ep" dimension of `mesh` (dp / ep x ep
    data-parallel ranks): each rank holds num_experts / ep experts of each layer (a DTensor sharded on the expert
    dimension) and runs them on the tokens routed to them from the ep group (`dispatch`, `combine`). Their
    gradients are those of the ep group's tokens: summed over the replicas holding the same experts
    ("dp_mod_ep") and divided by dp, they are the mean over the global batch, as every other weight's (the
    strategy's to do). Each layer's tokens per expert, as this rank routed them, are added up in `tokens` (by
    path)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    ep_group = mesh["ep"].get_group()
    for path, layer in expert_layers(model).items():
        for name, p in list(layer.named_parameters(recurse=False)):
            if p.shape[0] != layer.num_experts:
                continue
            local = nn.Parameter(distribute_tensor(p, mesh["ep"], [Shard(0)], src_data_rank=None),
                                 requires_grad=p.requires_grad)
            layer.register_parameter(name, local)
        layer.forward = partial(_expert_parallel_forward, layer, type(layer).forward, ep_group, tokens, path)


def _expert_parallel_forward(layer, forward, group, tokens: dict, path: str, hidden_states, top_k_index,
                             top_k_weights):
    """The layer's own forward (`forward`, unbound) on this rank's experts and the tokens routed to them, each
    token once per expert it chose, weighted by its router's weight after coming back."""
    n, k = top_k_index.shape
    experts = top_k_index.reshape(-1)
    owner = torch.arange(n, device=hidden_states.device).repeat_interleave(k)
    arrived, local, route = dispatch(hidden_states[owner], experts, layer.num_experts, group)
    if route.per_expert is not None:
        count_tokens(tokens, path, route.per_expert)
    weights = {name: p.to_local() for name, p in layer.named_parameters(recurse=False)}
    per_rank = layer.num_experts // dist.get_world_size(group)
    if detect_fake_mode(hidden_states) is None:
        out = _on_local_experts(layer, forward, weights, per_rank, arrived, local)
    else:
        out = _balanced_experts(layer, weights, per_rank, arrived)
    back = combine(out, route, group) * top_k_weights.reshape(-1, 1).to(out.dtype)
    return _summed(back, n, k).to(hidden_states.dtype)


def count_tokens(load: dict, path: str, counts: list[int]) -> None:
    """Add one forward's tokens per expert of layer `path` to `load`: {path: {"tokens": per expert, "max_over_mean":
    the busiest expert's tokens over the mean (1: balanced), "dropped": 0 (no capacity: every token is computed)}}."""
    tokens = [a + b for a, b in zip(load.get(path, {}).get("tokens") or [0] * len(counts), counts, strict=True)]
    mean = sum(tokens) / len(tokens)
    load[path] = {"tokens": tokens, "max_over_mean": max(tokens) / mean if mean else None, "dropped": 0}


def balanced_when_simulated(model: nn.Module) -> None:
    """Run each expert layer of `model` holding its experts' weights stacked (not transposed, without biases) by
    `balanced_forward` on fake tensors, by its own forward otherwise."""
    for layer in expert_layers(model).values():
        if not getattr(layer, "is_transposed", False) and not getattr(layer, "has_bias", False):
            layer.forward = partial(_balanced_when_simulated, layer, type(layer).forward)


def _balanced_when_simulated(layer, forward, hidden_states, top_k_index, top_k_weights):
    if detect_fake_mode(hidden_states) is None:
        return forward(layer, hidden_states, top_k_index, top_k_weights)
    return balanced_forward(layer, hidden_states, top_k_index, top_k_weights)


def balanced_forward(layer, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """A simulated expert layer (fake tensors, which have no values to route by; the planner's, the FLOP
    counter's): each token's k choices spread evenly over the experts, run as one batched product: the shapes,
    FLOPs and saved tensors of the per-expert products under a balanced router. Not transformers' own experts:
    their grouped_mm has no fp32 kernel on fake tensors, and their batched_mm copies each token's expert's
    weights ([tokens x k, 2 x hidden, d])."""
    n, k = top_k_index.shape
    owner = torch.arange(n, device=hidden_states.device).repeat_interleave(k)
    weights = {"gate_up_proj": layer.gate_up_proj, "down_proj": layer.down_proj}
    out = _balanced_experts(layer, weights, layer.num_experts, hidden_states[owner])
    out = out * top_k_weights.reshape(-1, 1).to(out.dtype)
    return _summed(out, n, k).to(hidden_states.dtype)


def _summed(out: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Each of n tokens' k outputs (in token order) summed: a view and a sum, which keep nothing for backward
    (an index_add keeps its source: a copy of the layer's output, as transformers' batched experts avoid)."""
    return out.view(n, k, out.shape[-1]).sum(dim=1)


def _balanced_experts(layer, weights: dict, per_rank: int, arrived):
    """A simulated rank's experts (fake tensors: no values to route by): the arrived tokens split evenly over
    them, each expert's gated MLP (gate and up projections stacked, as transformers' MoE experts hold them) as a
    batched product, holding for backward what the per-expert products hold."""
    per_expert = len(arrived) // per_rank
    x = arrived[:per_expert * per_rank].view(per_rank, per_expert, -1)
    out = gated_mlps(x, weights["gate_up_proj"], weights["down_proj"], layer.act_fn).flatten(0, 1)
    if len(out) == len(arrived):  # no copy: the router's weights multiply it and keep it for backward
        return out
    return torch.cat([out, out.new_zeros(len(arrived) - len(out), out.shape[-1])])


def gated_mlps(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act) -> torch.Tensor:
    """Each expert's gated MLP on its tokens, as one batched product: x [experts, tokens, d], gate_up [experts,
    2 x hidden, d] (gate and up projections stacked, as transformers' MoE experts hold them), down [experts, d,
    hidden]."""
    gate, up = torch.bmm(x, gate_up.to(x.dtype).transpose(1, 2)).chunk(2, dim=-1)
    return torch.bmm(act(gate) * up, down.to(x.dtype).transpose(1, 2))


def _on_local_experts(layer, forward, weights: dict, per_rank: int, arrived, local):
    """The layer's own expert computation with its weights swapped for this rank's and its expert count for
    theirs: each arrived token goes to its one local expert at weight 1."""
    from torch.nn.utils.stateless import _reparametrize_module

    total, layer.num_experts = layer.num_experts, per_rank
    try:
        with _reparametrize_module(layer, weights):
            return forward(layer, arrived, local[:, None], arrived.new_ones(len(arrived), 1))
    finally:
        layer.num_experts = total
