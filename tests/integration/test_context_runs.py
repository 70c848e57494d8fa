"""Context parallelism's attention on 2 real gloo ranks against one process's causal attention."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def attend_on_two_ranks(rank: int, port: int, q, k, v, out_grad, results) -> None:
    from bench.parallel.context import allgather_attention, shard_sequence

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mine = [shard_sequence(t, 2, rank, dim=2).detach().requires_grad_() for t in (q, k, v)]
        out = allgather_attention(*mine)
        out.backward(shard_sequence(out_grad, 2, rank, dim=2))
        results[rank] = [out.detach(), *(t.grad for t in mine)]
    finally:
        dist.destroy_process_group()


def test_allgather_attention_matches_one_process_in_values_and_gradients():
    """Llama-style grouped-query shapes (4 query heads, 2 key/value heads), 16 tokens over 2 ranks: each rank's
    output and its queries', keys' and values' gradients are those of one process at its positions (the keys'
    and values' summed over the ranks whose queries used them)."""
    from bench.parallel.context import shard_sequence

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    out_grad = torch.randn(2, 4, 16, 8)
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*whole, is_causal=True, enable_gqa=True)
    expected.backward(out_grad)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(attend_on_two_ranks, args=(port, q, k, v, out_grad, results), nprocs=2)
    for rank in range(2):
        out, *grads = results[rank]
        wanted = [expected.detach(), *(t.grad for t in whole)]
        for got, want in zip([out, *grads], wanted, strict=True):
            torch.testing.assert_close(got, shard_sequence(want, 2, rank, dim=2), rtol=1e-5, atol=1e-6)
