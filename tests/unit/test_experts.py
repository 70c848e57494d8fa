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


def _mixtral_experts(num_experts: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts)
    return MixtralForCausalLM(config)


def _saved_mb(forward) -> float:
    """What a forward keeps for backward, by storage."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values()) / 2**20


def test_a_simulated_expert_layer_keeps_what_transformers_experts_keep():
    """The planner's experts (fake tensors have no values to route by: tokens spread evenly) keep for backward what
    transformers' own keep under an even router, within 5 % (a copy of the output more: 10 %, the +11 % the
    planner over-predicted a Mixtral by)."""
    from bench.parallel.experts import balanced_forward

    torch.manual_seed(0)
    experts = _mixtral_experts(4).model.layers[0].mlp.experts
    tokens = torch.randn(1024, 32, requires_grad=True)
    chosen = torch.arange(2048).remainder(4).view(1024, 2)  # each expert 512 of the 2048 choices
    weights = torch.rand(1024, 2, requires_grad=True)
    theirs = _saved_mb(lambda: experts(tokens, chosen, weights))
    ours = _saved_mb(lambda: balanced_forward(experts, tokens, chosen, weights))
    assert ours == pytest.approx(theirs, rel=0.05)


@pytest.mark.parametrize("num_experts, sharded_on", [(4, None), (3, 1)])
def test_fsdp_shards_experts_on_their_second_dimension_where_their_count_does_not_divide(num_experts, sharded_on):
    """3 experts over 2 shards would pad each rank's shard to 2 experts; 4 split evenly on the first dimension."""
    from torch.distributed.tensor import Shard

    from bench.strategies.fsdp import experts_placement

    model = _mixtral_experts(num_experts)
    placement = experts_placement(model, 2)
    experts = model.model.layers[0].mlp.experts
    expected = Shard(sharded_on) if sharded_on is not None else None
    assert placement(experts.gate_up_proj) == expected and placement(experts.down_proj) == expected
    assert placement(model.model.embed_tokens.weight) is None
