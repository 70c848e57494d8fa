"""A user's own model, outside the bench package, as `model=custom` takes one: `model.module._target_=yournet.build`
with this folder on PYTHONPATH (see tests/test_your_model.py)."""

import torch
from torch import nn


class Layer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, vocab: int, width: int, depth: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Layer(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.out(self.norm(x))


def build(vocab: int = 64, width: int = 32, depth: int = 2) -> Net:
    return Net(vocab, width, depth)


def batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's own synthetic batch (model.inputs._target_): tokens and their successors."""
    seq = torch.randint(0, 64, (batch_size, 17), generator=generator)
    return seq[:, :-1], seq[:, 1:]
