"""Expert parallelism's routing by hand: which rank each token goes to, and how many."""

import pytest
import torch

from bench.parallel.experts import destinations


def test_tokens_are_sorted_by_the_rank_holding_their_expert_and_counted():
    """8 experts over 2 ranks (0-3 on rank 0, 4-7 on rank 1): tokens for experts 5, 1, 7, 0, 4 go 1, 0, 1, 0, 1;
    sorted stably, the rank-0 tokens (1 and 3) first, then 0, 2 and 4."""
    order, counts, per_expert = destinations(torch.tensor([5, 1, 7, 0, 4]), 8, 2)
    assert order.tolist() == [1, 3, 0, 2, 4] and counts == [2, 3] and per_expert == [1, 1, 0, 0, 1, 1, 0, 1]
    order, counts, _ = destinations(torch.tensor([5, 1, 7, 0, 4]), 8, 4)
    assert counts == [2, 0, 2, 1], "2 experts a rank: ranks 2, 0, 3, 0, 2; rank 1 receives nothing"
    with pytest.raises(ValueError, match="8 experts do not split over 3 ranks"):
        destinations(torch.tensor([0]), 8, 3)
