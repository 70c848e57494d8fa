"""A mixture-of-experts feed-forward for bench's GPT (`model.experts > 0`): a router picks each token's top-k of
n experts (Mixtral's: softmax over the experts, the top k renormalised), and the chosen experts' gated GELU
MLPs run on it, weighted by the router. The experts' weights are stacked and called as transformers' MoE
experts are (`Experts.forward(hidden_states, top_k_index, top_k_weights)`, `gate_up_proj`, `down_proj`), so
expert parallelism (`bench.parallel.experts`) splits them as it splits a Hugging Face model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._guards import detect_fake_mode

from bench.parallel.experts import balanced_forward


class Experts(nn.Module):
    def __init__(self, d_model: int, hidden: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.act_fn = F.gelu

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [tokens, d], each token's experts and router weights [tokens, k] -> [tokens, d]."""
        if detect_fake_mode(hidden_states) is not None:
            return balanced_forward(self, hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, choice = torch.where(top_k_index == expert)
            if len(token):
                y = self.mlp(hidden_states[token], self.gate_up_proj[expert], self.down_proj[expert])
                out.index_add_(0, token, y * top_k_weights[token, choice, None])
        return out

    def mlp(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, down)


class MoE(nn.Module):
    def __init__(self, d_model: int, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = Experts(d_model, hidden, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.reshape(-1, d)
        probs = F.softmax(self.router(tokens).float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        return self.experts(tokens, index, weights).reshape(b, t, d)
