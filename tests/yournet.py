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


class Tied(Net):
    """The output layer's weight is the embedding's (GPT-2's and Llama 3.2's tying)."""

    def __init__(self, vocab: int, width: int, depth: int):
        super().__init__(vocab, width, depth)
        self.out.weight = self.embed.weight


class Keyed(Net):
    """A forward returning a dict (as many codebases' models do)."""

    def __init__(self, vocab: int, width: int, depth: int, key: str):
        super().__init__(vocab, width, depth)
        self.key = key

    def forward(self, tokens: torch.Tensor) -> dict:
        return {self.key: super().forward(tokens)}


class Patches(nn.Module):
    """A ViT on 8x8 images, its patch embedding written as timm writes it: the activation handed to the blocks is
    a transposed (non-contiguous) view."""

    def __init__(self, width: int = 16, depth: int = 2, classes: int = 5):
        super().__init__()
        self.patch = nn.Conv2d(3, width, kernel_size=4, stride=4)
        self.layers = nn.ModuleList(Layer(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = embed_patches(self, images)
        for layer in self.layers:
            x = layer(x)
        return classify(self, x)


def embed_patches(m: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return m.patch(images).flatten(2).transpose(1, 2)


def classify(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.head(x.mean(1))


def build(vocab: int = 64, width: int = 32, depth: int = 2) -> Net:
    return Net(vocab, width, depth)


def batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's own synthetic batch (model.inputs._target_): tokens and their successors."""
    seq = torch.randint(0, 64, (batch_size, 17), generator=generator)
    return seq[:, :-1], seq[:, 1:]


BUILDS: list[dict] = []  # every call of `counted`, for the tests that count them


def counted(**kwargs) -> Net:
    BUILDS.append(kwargs)
    return build(**kwargs)


def exits(**kwargs) -> Net:
    raise SystemExit(3)


def slow(seconds: float = 60.0, **kwargs) -> Net:
    import time

    time.sleep(seconds)
    return build(**kwargs)
