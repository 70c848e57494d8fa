"""Context parallelism's pieces (`parallel.cp`): the sequence split over the cp ranks in load-balanced causal
chunks (`chunk_positions`, `shard_sequence`), and causal attention over the split sequence by all-gathering the
keys and values (`allgather_attention`): the Llama 3 paper's method. It runs on gloo and the CPU, where torch's
ring attention (`torch.distributed.tensor.experimental.context_parallel`) does not: torch 2.13 has no sharding
strategy for the CPU's flash-attention operator."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def chunk_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The token positions rank `rank` of `cp` holds: of the sequence cut into 2 x cp equal chunks, chunks `rank`
    and 2 x cp - 1 - `rank`, so that each rank's share of causal attention's work is the same (an early chunk
    attends to few keys, a late one to many), as torchtitan and Megatron balance it."""
    if seq_len % (2 * cp):
        raise ValueError(f"a sequence of {seq_len} tokens does not cut into 2 x {cp} equal chunks")
    chunk = seq_len // (2 * cp)
    late = 2 * cp - 1 - rank
    return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk), torch.arange(late * chunk, (late + 1) * chunk)])


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of `x` (its chunks, `chunk_positions`) along the sequence dimension `dim`."""
    return x.index_select(dim, chunk_positions(x.shape[dim], cp, rank).to(x.device))


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence's keys and values: q, k and v are
    [batch, heads, tokens, head dim] at this rank's positions (`chunk_positions`; k and v may have fewer heads,
    grouped-query attention). K and V are all-gathered over the cp `group` (their gradients summed back to
    each rank in backward), and each query attends to the keys at or before its own position."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    seq_len = q.shape[-2] * cp
    keys, values = gathered(k, group), gathered(v, group)
    mine = chunk_positions(seq_len, cp, rank).to(q.device)
    everyone = torch.cat([chunk_positions(seq_len, cp, r) for r in range(cp)]).to(q.device)
    causal = everyone[None, :] <= mine[:, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal, enable_gqa=k.shape[1] != q.shape[1])


def gathered(t: torch.Tensor, group) -> torch.Tensor:
    """Every cp rank's `t`, in rank order along the sequence (dim -2); in backward, each rank's piece's gradient
    summed over the ranks. The pieces' gradients are made contiguous first: the concatenation hands back strided
    slices, which gloo's all-to-all (the reduce-scatter torch emulates off NCCL) sent as garbage."""
    from torch.distributed.nn.functional import all_gather

    pieces = all_gather(t.contiguous(), group=group)
    for piece in pieces:
        if piece.requires_grad:
            piece.register_hook(torch.Tensor.contiguous)
    return torch.cat(pieces, dim=-2)
