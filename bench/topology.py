"""Where this rank sits: world, node, device and the parallel degrees, checked once."""

from __future__ import annotations

import os
from dataclasses import dataclass


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    device: str  # "cpu" or "cuda:<local_rank>"
    backend: str = "gloo"  # the process group's backend
    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise TopologyError(f"rank must be in [0, world_size={self.world_size}), got rank={self.rank}")
        if self.dp * self.tp * self.pp != self.world_size:
            raise TopologyError(
                f"dp*tp*pp must equal the world size: {self.dp}*{self.tp}*{self.pp} != {self.world_size}"
            )

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_rank(self) -> int:
        # Ranks are laid out dp-major: the tp*pp ranks of one model replica are consecutive.
        return self.rank // (self.tp * self.pp)

    @classmethod
    def from_env(cls, device_kind: str, backend: str = "auto", tp: int = 1, pp: int = 1) -> Topology:
        """Read torchrun's env:// variables (a plain process counts as a world of one)."""
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local_rank}" if device_kind == "cuda" else "cpu"
        if world_size % (tp * pp):
            raise TopologyError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
        return cls(
            world_size=world_size,
            rank=int(os.environ.get("RANK", 0)),
            local_rank=local_rank,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
            device=device,
            backend=default_backend(device_kind) if backend == "auto" else backend,
            dp=world_size // (tp * pp),
            tp=tp,
            pp=pp,
        )


def default_backend(device_kind: str) -> str:
    return "nccl" if device_kind == "cuda" else "gloo"
