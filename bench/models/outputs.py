"""What every model shares around its forward: token batches, the logits of an output, and bench's loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


def token_batch(vocab_size: int, seq_len: int, batch_size: int, gen: torch.Generator):
    """Uniform random tokens and their targets, the inputs shifted by one (next-token prediction)."""
    seq = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def logits_of(output):
    """A forward's logits: the tensor itself, or its `logits` (a Hugging Face output, a dict holding them)."""
    if isinstance(output, Mapping):
        return output.get("logits", output)
    return getattr(output, "logits", output)


def loss_fn(output, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every prediction (classes for the MLP/CNN, next tokens for the decoders). The
    targets are already shifted: a Hugging Face model gets no `labels` and its `.logits` are used as they are."""
    return F.cross_entropy(logits_of(output).flatten(0, -2).float(), targets.flatten())
