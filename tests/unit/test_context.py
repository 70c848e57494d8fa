"""Context parallelism's pieces by hand: the load-balanced chunks of the sequence."""

import pytest
import torch

from bench.parallel.context import chunk_positions, in_sequence_order, lower_right, shard_sequence


def test_each_rank_holds_an_early_and_a_late_chunk_and_every_token_is_held_once():
    """8 tokens over 2 ranks: rank 0 the first and last quarter, rank 1 the middle two; causal attention's work
    (keys before each query) is then 1+2+7+8 = 3+4+5+6 = 18 a rank."""
    assert chunk_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert chunk_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    for cp in (1, 2, 4):
        held = torch.cat([chunk_positions(64, cp, rank) for rank in range(cp)])
        assert sorted(held.tolist()) == list(range(64))
        work = {int((chunk_positions(64, cp, rank) + 1).sum()) for rank in range(cp)}
        assert len(work) == 1, "each rank attends to as many keys"
    x = torch.arange(2 * 8).reshape(2, 8)
    assert shard_sequence(x, 2, 1).tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]


def test_a_sequence_that_does_not_cut_into_equal_chunks_is_refused():
    with pytest.raises(ValueError, match="does not cut into 2 x 4 equal chunks"):
        chunk_positions(12, 4, 0)


def test_the_gathered_chunks_go_back_in_sequence_order():
    """Gathered over 2 ranks, 8 positions arrive as rank 0's [0, 1, 6, 7] then rank 1's [2, 3, 4, 5]."""
    gathered = torch.cat([chunk_positions(8, 2, rank) for rank in range(2)]).float().reshape(1, 1, 8, 1)
    assert in_sequence_order(gathered, 2).flatten().tolist() == list(range(8))


def test_a_chunk_attends_to_the_keys_up_to_its_own_end():
    """2 queries at positions 4 and 5 over keys 0..5: the first sees 0..4, the second 0..5; one mask per shape
    while a step keeps it (every layer's attention holds the same for backward)."""
    mask = lower_right(2, 6, torch.zeros(1))
    assert (mask == 0).tolist() == [[True] * 5 + [False], [True] * 6]
    assert lower_right(2, 6, torch.zeros(1)) is mask
