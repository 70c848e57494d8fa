"""Expert parallelism's token exchange on 2 real gloo ranks against one process running every expert."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N_EXPERTS, WIDTH = 4, 3


def experts_weights() -> torch.Tensor:
    return torch.randn(N_EXPERTS, WIDTH, WIDTH, generator=torch.Generator().manual_seed(1))


def exchange_on_two_ranks(rank: int, port: int, tokens, experts, results) -> None:
    from bench.parallel.experts import combine, dispatch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mine = tokens[rank].clone().requires_grad_()
        arrived, local, route = dispatch(mine, experts[rank], N_EXPERTS)
        weights = experts_weights()[rank * 2:(rank + 1) * 2]  # this rank's two experts
        out = combine(torch.bmm(weights[local], arrived.unsqueeze(-1)).squeeze(-1), route)
        out.sum().backward()
        results[rank] = (out.detach(), mine.grad, route.sent, route.received)
    finally:
        dist.destroy_process_group()


def test_tokens_go_to_their_experts_rank_and_come_back_in_their_place():
    """Rank 0 sends 5 tokens (3 to rank 1's experts), rank 1 sends 4 (1 to rank 0's): each token's output and
    gradient are those of its expert applied in one process; the counts sent and received are exchanged first."""
    torch.manual_seed(0)
    tokens = [torch.randn(5, WIDTH), torch.randn(4, WIDTH)]
    experts = [torch.tensor([3, 0, 2, 1, 3]), torch.tensor([2, 3, 0, 3])]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(exchange_on_two_ranks, args=(port, tokens, experts, results), nprocs=2)
    weights = experts_weights()
    for rank in range(2):
        out, grad, sent, received = results[rank]
        x = tokens[rank].clone().requires_grad_()
        expected = torch.bmm(weights[experts[rank]], x.unsqueeze(-1)).squeeze(-1)
        expected.sum().backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(grad, x.grad)
    assert (results[0][2], results[0][3]) == ([2, 3], [2, 1]) and (results[1][2], results[1][3]) == ([1, 3], [3, 3])
