"""Context and expert parallelism's pieces on 2 real gloo ranks (one spawn for both), against one process."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.xdist_group("parallel_pieces")  # one worker: both tests read one spawn

N_EXPERTS, WIDTH = 4, 3
WINDOW = 5  # a sliding window (Mistral's): each query sees itself and the 4 keys before it


def attention_inputs() -> list[torch.Tensor]:
    """Llama-style grouped-query shapes: q, k, v (4 query heads, 2 key/value heads, 16 tokens) and the output's
    gradient."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g),
            torch.randn(2, 2, 16, 8, generator=g), torch.randn(2, 4, 16, 8, generator=g)]


def expert_inputs() -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Rank 0's 5 tokens (3 for rank 1's experts) and rank 1's 4 (1 for rank 0's), their experts, and the 4
    experts' weights (2 a rank)."""
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randn(5, WIDTH, generator=g), torch.randn(4, WIDTH, generator=g)]
    experts = [torch.tensor([3, 0, 2, 1, 3]), torch.tensor([2, 3, 0, 3])]
    return tokens, experts, torch.randn(N_EXPERTS, WIDTH, WIDTH, generator=g)


def on_each_rank(rank: int, port: int, results) -> None:
    from bench.parallel.context import allgather_attention, ring_attention, shard_sequence
    from bench.parallel.experts import combine, dispatch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        *qkv, out_grad = attention_inputs()
        attention = {}
        for method, attend in (("allgather", allgather_attention), ("ring", ring_attention)):
            mine = [shard_sequence(t, 2, rank, dim=2).requires_grad_() for t in qkv]
            out = attend(*mine)
            out.backward(shard_sequence(out_grad, 2, rank, dim=2))
            attention[method] = [out.detach(), *(t.grad for t in mine)]
        windowed = allgather_attention(*(shard_sequence(t, 2, rank, dim=2) for t in qkv), window=WINDOW)

        tokens, experts, weights = expert_inputs()
        x = tokens[rank].clone().requires_grad_()
        arrived, local, route = dispatch(x, experts[rank], N_EXPERTS)
        mine_weights = weights[rank * 2:(rank + 1) * 2]
        y = combine(torch.bmm(mine_weights[local], arrived.unsqueeze(-1)).squeeze(-1), route)
        y.sum().backward()
        results[rank] = {"attention": attention, "windowed": windowed,
                         "experts": (y.detach(), x.grad, route.sent, route.received)}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(on_each_rank, args=(port, results), nprocs=2)
    return dict(results)


@pytest.mark.parametrize("method", ["allgather", "ring"])
def test_context_parallel_attention_matches_one_process_in_values_and_gradients(two_ranks, method):
    """Each rank's output and its queries', keys' and values' gradients are those of one process's causal
    attention at its positions (the keys' and values' summed over the ranks whose queries used them): the keys
    and values gathered, or passed around the ranks (torch's ring attention on the CPU's kernel)."""
    from bench.parallel.context import shard_sequence

    *qkv, out_grad = attention_inputs()
    whole = [t.clone().requires_grad_() for t in qkv]
    expected = F.scaled_dot_product_attention(*whole, is_causal=True, enable_gqa=True)
    expected.backward(out_grad)
    for rank in range(2):
        for got, want in zip(two_ranks[rank]["attention"][method], [expected.detach(), *(t.grad for t in whole)],
                             strict=True):
            torch.testing.assert_close(got, shard_sequence(want, 2, rank, dim=2), rtol=1e-5, atol=1e-6)


def test_tokens_go_to_their_experts_rank_and_come_back_in_their_place(two_ranks):
    """Each token's output and gradient are those of its expert applied in one process; the counts sent and
    received were exchanged first."""
    tokens, experts, weights = expert_inputs()
    for rank in range(2):
        out, grad, _, _ = two_ranks[rank]["experts"]
        x = tokens[rank].clone().requires_grad_()
        expected = torch.bmm(weights[experts[rank]], x.unsqueeze(-1)).squeeze(-1)
        expected.sum().backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(grad, x.grad)
    assert two_ranks[0]["experts"][2:] == ([2, 3], [2, 1]) and two_ranks[1]["experts"][2:] == ([1, 3], [3, 3])


def test_allgather_attention_keeps_a_sliding_window(two_ranks):
    from bench.parallel.context import shard_sequence

    q, k, v, _ = attention_inputs()
    positions = torch.arange(q.shape[2])
    allowed = (positions[None, :] <= positions[:, None]) & (positions[None, :] > positions[:, None] - WINDOW)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    for rank in range(2):
        torch.testing.assert_close(two_ranks[rank]["windowed"], shard_sequence(expected, 2, rank, dim=2), rtol=1e-5,
                                   atol=1e-6)
