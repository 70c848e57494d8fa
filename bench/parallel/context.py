"""Context parallelism's pieces (`parallel.cp`): the sequence split over the cp ranks in load-balanced causal
chunks (`chunk_positions`, `shard_sequence`), and causal attention over the split sequence by all-gathering the
keys and values (`allgather_attention`): the Llama 3 paper's method. It runs on gloo and the CPU, where torch's
ring attention (`torch.distributed.tensor.experimental.context_parallel`) does not: torch 2.13 has no sharding
strategy for the CPU's flash-attention operator. Or by passing them around the ranks (`ring_attention`): torch's
ring attention run on the device's own kernel, the CPU's too."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._guards import detect_fake_mode


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


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, scale: float | None = None,
                        window: int | None = None) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence's keys and values: q, k and v are
    [batch, heads, tokens, head dim] at this rank's positions (`chunk_positions`; k and v may have fewer heads,
    grouped-query attention). K and V are all-gathered over the cp `group` (their gradients summed back to
    each rank in backward) and put in sequence order. Each of the rank's two chunks then attends to the keys up
    to its own end, causal aligned to the lower right (`causal_lower_right`: flash attention on CUDA, no mask
    made), or with a sliding `window` (fewer than `window` positions back) through a mask."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = q.shape[-2] // 2
    keys, values = (in_sequence_order(gathered(t, group), cp) for t in (k, v))
    # grouped-query attention: each key/value head serves q heads / kv heads queries, gathered once and not
    # repeated per query head (flash attention takes them as they are: a 70B Llama's 8 K/V heads for 64)
    gqa = k.shape[1] != q.shape[1]
    if window is not None:
        mine = chunk_positions(keys.shape[-2], cp, rank).to(q.device)[:, None]
        everyone = torch.arange(keys.shape[-2], device=q.device)[None, :]
        allowed = (everyone <= mine) & (everyone > mine - window)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    out = []
    for i, c in enumerate((rank, 2 * cp - 1 - rank)):
        end = (c + 1) * chunk
        out.append(F.scaled_dot_product_attention(q[..., i * chunk:(i + 1) * chunk, :], keys[..., :end, :],
                                                  values[..., :end, :], attn_mask=lower_right(chunk, end, q),
                                                  scale=scale, enable_gqa=gqa))
    return torch.cat(out, dim=-2)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, scale: float | None = None,
                   window: int | None = None) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence by passing the keys and values around the
    cp ranks (`strategy.cp_method=ring`): torch's ring attention (`torch.distributed.tensor.experimental`'s
    context parallelism, its load-balanced chunks the same as `chunk_positions`), each step one kernel call on
    the chunks at hand, the partial outputs merged by their logsumexp; the next chunks move over all-to-all
    while it computes. Run here as an autograd function on the device's own kernel (`_ring_kernels`), not
    through torch's DTensor dispatch, which has no CPU kernel. Holds one chunk of keys and values at a time,
    not the whole sequence's. Grouped-query attention's keys and values are repeated per query head first."""
    if window is not None:
        raise NotImplementedError("strategy.cp_method=ring has no sliding window: this model attends within "
                                  f"{window} positions (strategy.cp_method=allgather has)")
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return _Ring.apply(q.contiguous(), k.contiguous(), v.contiguous(), group or dist.group.WORLD, scale)


def has_ring_attention() -> bool:
    try:
        from torch.distributed.tensor.experimental._context_parallel._attention import (  # noqa: F401
            _templated_ring_attention,
            _templated_ring_attention_backward,
        )
    except ImportError:
        return False
    return True


def _ring_kernels(q: torch.Tensor):
    """The attention kernel the ring runs on each pair of chunks for `q`'s device and dtype, the keywords it takes
    beyond the chunks, its backward, the name of the backward's gradient argument, and what the backward takes
    of what the forward returned beyond its output and logsumexp (torch's ring wrappers' arguments)."""
    aten = torch.ops.aten
    if q.device.type == "cpu":
        return (aten._scaled_dot_product_flash_attention_for_cpu.default, {},
                aten._scaled_dot_product_flash_attention_for_cpu_backward.default, "grad_out", lambda rest: {})
    if q.dtype in (torch.float16, torch.bfloat16):
        names = ("cum_seq_q", "cum_seq_k", "max_q", "max_k", "philox_seed", "philox_offset")
        return (aten._scaled_dot_product_flash_attention.default, {},
                aten._scaled_dot_product_flash_attention_backward.default, "grad_out",
                lambda rest: dict(zip(names, rest[:len(names)], strict=True)))  # not its debug mask
    return (aten._scaled_dot_product_efficient_attention.default, {"attn_bias": None, "compute_log_sumexp": True},
            aten._scaled_dot_product_efficient_attention_backward.default, "grad_out_",
            lambda rest: {"attn_bias": None, "philox_seed": rest[0], "philox_offset": rest[1],
                          "grad_input_mask": (True, True, True, False)})


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale):
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp

        cp._cp_options.rotate_method = cp._RotateMethod.ALL_TO_ALL  # the ring's passes (torch's default gathers)
        kernel, extra, ctx.backward_kernel, ctx.grad_name, after = _ring_kernels(q)
        out, logsumexp, *rest = cp._templated_ring_attention(group, 2, kernel, q, k, v, is_causal=True,
                                                             dropout_p=0.0, scale=scale, **extra)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        ctx.group, ctx.scale, ctx.rest = group, scale, after(rest)
        return out

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp

        q, k, v, out, logsumexp = ctx.saved_tensors
        dq, dk, dv, *_ = cp._templated_ring_attention_backward(
            ctx.group, 2, ctx.backward_kernel, grad_out=grad.contiguous(), grad_out_name=ctx.grad_name, query=q,
            key=k, value=v, out=out, logsumexp=logsumexp, is_causal=True, dropout_p=0.0, scale=ctx.scale,
            **ctx.rest)
        return dq, dk, dv, None, None


# Held weakly: a mask lives while a step's graph keeps it for backward, and is made again in the next step, so
# that the step's memory (and a tracker measuring it) holds it as the step does.
_MASKS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def lower_right(queries: int, keys: int, like: torch.Tensor):
    """The mask of causal attention of `queries` over `keys`, the last query at the last key, for queries like
    `like`:
    - on CUDA, torch's lower-right causal bias, a tensor subclass holding no data (flash attention applies it);
      made outside any dispatch mode, under which making it fails ("Creating a new Tensor subclass CausalBias
      but the raw Tensor object is already associated to a python object", torch 2.13);
    - on the CPU, an additive mask (0 or -inf) in the queries' dtype, made once per shape and step (`_MASKS`): the CPU's
      flash kernel converts a boolean mask to one at every call and keeps it for backward (256 MB per layer
      at 16,384 tokens and cp = 2), where every layer can keep the same one. A simulated rank (fake tensors
      on the CPU) holds it too: for a CUDA rank, which does not, it over-counts queries x keys elements."""
    from torch.nn.attention.bias import causal_lower_right
    from torch.utils._python_dispatch import _disable_current_modes

    if like.device.type == "cuda":
        with _disable_current_modes():
            return causal_lower_right(queries, keys)
    key = (queries, keys, like.dtype, str(like.device), id(detect_fake_mode(like)))
    mask = _MASKS.get(key)
    if mask is None:
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=like.device).tril(keys - queries)
        mask = torch.zeros(queries, keys, dtype=like.dtype, device=like.device).masked_fill(~allowed, float("-inf"))
        _MASKS[key] = mask
    return mask


def in_sequence_order(t: torch.Tensor, cp: int) -> torch.Tensor:
    """The ranks' chunks as gathered (rank 0's two, then rank 1's, ...) put back in sequence order (dim -2)."""
    held = torch.cat([torch.tensor([r, 2 * cp - 1 - r]) for r in range(cp)])
    chunks = t.unflatten(-2, (2 * cp, t.shape[-2] // (2 * cp)))
    return chunks.index_select(-3, torch.argsort(held).to(t.device)).flatten(-3, -2)


@dataclass(frozen=True)
class ContextGroup:
    """What a model needs to run context-parallel (its `context_parallel` hook keeps it): the cp group, the
    positions of this rank's tokens, and attention over the whole sequence."""

    group: object  # the cp ranks' ProcessGroup
    method: str = "allgather"  # or "ring" (`strategy.cp_method`)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def positions(self, tokens: int, device) -> torch.Tensor:
        """The positions in the whole sequence of this rank's `tokens` tokens."""
        return chunk_positions(tokens * self.size, self.size, dist.get_rank(self.group)).to(device)

    def attention(self, q, k, v, scale: float | None = None, window: int | None = None) -> torch.Tensor:
        attend = ring_attention if self.method == "ring" else allgather_attention
        return attend(q, k, v, self.group, scale, window)


def gathered(t: torch.Tensor, group) -> torch.Tensor:
    """Every cp rank's `t`, in rank order along the sequence (dim -2); in backward, each rank's piece's gradient
    summed over the ranks (`_Gather`)."""
    return _Gather.apply(t, group)


class _Gather(torch.autograd.Function):
    """All-gather along dim -2; backward: reduce-scatter of the gradient (an all-reduce and one's own slice on
    gloo, which has no reduce-scatter). Not `torch.distributed.nn.functional.all_gather`: on gloo its backward
    scatters from each group rank's index taken as a global rank, and fails in any group not starting at
    rank 0 ("Global rank 1 is not part of group", torch 2.13)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        cp = dist.get_world_size(group)
        out = t.new_empty((cp * t.shape[0], *t.shape[1:]))
        dist.all_gather_into_tensor(out, t.contiguous(), group=group)
        return out.unflatten(0, (cp, t.shape[0])).movedim(0, -3).flatten(-3, -2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        if dist.get_backend(group) == "gloo":
            whole = grad.contiguous()
            dist.all_reduce(whole, group=group)
            return whole.chunk(cp, dim=-2)[rank].contiguous(), None
        pieces = grad.unflatten(-2, (cp, grad.shape[-2] // cp)).movedim(-3, 0).contiguous()
        mine = grad.new_empty(pieces.shape[1:])
        dist.reduce_scatter_tensor(mine, pieces.flatten(0, 1), group=group)
        return mine, None


# ------------------------------------------------------------------------------------- Hugging Face models

HF_ATTENTION = "bench_context_parallel"  # the name transformers' attention interface knows bench's under


def hf_context_parallel(model, context: ContextGroup) -> None:
    """A Hugging Face decoder run on this rank's share of each sequence: its forward is given the position ids
    of the rank's tokens (rotary or learned positions follow them), and every attention layer calls
    `hf_attention` through transformers' attention interface, which builds no mask for it (registered without
    one: the positions make it). The layers hand their keyword arguments down to the attention function, which
    takes the cp group from them."""
    from transformers import AttentionInterface

    AttentionInterface.register(HF_ATTENTION, hf_attention)
    model.set_attn_implementation(HF_ATTENTION)

    def split_sequence(_module, args, kwargs):
        tokens = args[0] if args else kwargs["input_ids"]
        positions = context.positions(tokens.shape[1], tokens.device)[None].expand(tokens.shape[0], -1)
        return args, {**kwargs, "position_ids": positions, "context_group": context}

    model.register_forward_pre_hook(split_sequence, with_kwargs=True)


def hf_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                 sliding_window=None, context_group=None, **kwargs):
    """transformers' attention function signature: q, k, v [batch, heads, tokens, head dim] in, the output as
    [batch, tokens, heads, head dim] and no weights out."""
    if context_group is None:
        raise RuntimeError(f"{type(module).__name__} was not handed the cp group: its layers do not pass their "
                           "keyword arguments to the attention function")
    if dropout:
        raise RuntimeError("attention dropout is not supported with context parallelism")
    out = context_group.attention(query, key, value, scale=scaling, window=sliding_window)
    return out.transpose(1, 2).contiguous(), None
