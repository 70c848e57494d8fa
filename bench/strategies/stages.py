"""The model cut at block boundaries into stages: what `pipeline` (a stage per rank) and `modelparallel` (a
stage per device of one process) share.

Each stage is a small module that holds the full model's own submodules under the full model's attribute
paths (its blocks in an nn.ModuleDict keyed by their index), so a stage's parameters are named exactly as in
the single run (`blocks.3.fc.weight`) and parity can compare them one by one. Where the cut goes is the
model's to say (`PIPELINE_SPLIT` and `BLOCKS` in its module, see `bench.models`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bench.errors import reject
from bench.models import ModelSpec, Split, build_on_meta, model_blocks, model_label, model_spec


def partition(n_blocks: int, n_stages: int) -> list[list[int]]:
    """Consecutive block indices per stage, as even as possible (earlier stages take the remainder)."""
    size, rest = divmod(n_blocks, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        end = start + size + (s < rest)
        out.append(list(range(start, end)))
        start = end
    return out


def bubble_fraction(pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle share of a step in the schedule's ideal timeline: (pp-1) / (v*m + pp-1), v stages per rank
    (v=1: GPipe and 1F1B; v>1: interleaved 1F1B, Megatron-LM's estimate)."""
    return (pp - 1) / (stages_per_rank * microbatches + pp - 1)


def check_splittable(cfg: dict, n_stages: int, key: str, got, hint: str = "") -> None:
    """The model declares its split and has at least one block per stage; else `key` (which set the number of
    stages, whose value is `got`) is the one to change."""
    spec = model_spec(cfg["model"])
    if spec.pipeline_split is None:
        reject("model", f"a model whose module defines PIPELINE_SPLIT (how its forward runs around its blocks) "
               f"with strategy={cfg['strategy']['name']}, which cuts it between its blocks", cfg["model"]["name"])
    model = build_on_meta(cfg["model"])
    first = {id(p) for path in spec.pipeline_split.pre for p in model.get_submodule(path).parameters()}
    if any(id(p) in first for path in spec.pipeline_split.post for p in model.get_submodule(path).parameters()):
        reject("model", "a model whose first and last layers share no weight with strategy="
               f"{cfg['strategy']['name']} (its output head is tied to its input embedding: one weight cannot "
               "live on two stages)", model_label(cfg["model"]), "; for a Hugging Face model set "
               "model.config.tie_word_embeddings=false")
    n_blocks = len(model_blocks(model, cfg["model"]))
    if n_stages > n_blocks:
        more = f"; or give the model more blocks ({spec.blocks_key})" if spec.blocks_key else ""
        reject(key, f"at most {n_blocks} stages in all, one block of the model each at least ({n_stages} asked)",
               got, hint + more)


def _attach(holder: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` under the dotted `path` in `holder`, making the empty containers on the way."""
    *parents, leaf = path.split(".")
    for name in parents:
        if not hasattr(holder, name):
            holder.add_module(name, nn.Module())
        holder = getattr(holder, name)
    holder.add_module(leaf, module)


class Stage(nn.Module):
    """The blocks `block_ids` of `model` (plus the layers before the blocks on the first stage and those
    after them on the last), held under the full model's paths so parameter names match the single run."""

    def __init__(self, model: nn.Module, spec: ModelSpec, block_ids: list[int], first: bool, last: bool,
                 autocast_dtype: torch.dtype | None = None, device_type: str = "cpu"):
        super().__init__()
        self.split: Split = spec.pipeline_split
        self.first, self.last = first, last
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        blocks = spec.blocks_of(model)
        for path in (self.split.pre if first else ()) + self.split.shared:
            _attach(self, path, model.get_submodule(path))
        _attach(self, spec.blocks, nn.ModuleDict({str(i): blocks[i] for i in block_ids}))
        self.blocks_path = spec.blocks
        for path in self.split.post if last else ():
            _attach(self, path, model.get_submodule(path))

    @property
    def stage_blocks(self) -> nn.ModuleDict:
        return self.get_submodule(self.blocks_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(self.device_type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            if self.first:
                x = self.split.embed(self, x)
            for block in self.stage_blocks.values():
                x = self.split.run_block(self, block, x) if self.split.run_block else block(x)
            if self.last:
                x = self.split.head(self, x)
        return x


def build_stages(model: nn.Module, spec: ModelSpec, n_stages: int, **kwargs) -> list[Stage]:
    parts = partition(len(spec.blocks_of(model)), n_stages)
    return [Stage(model, spec, ids, first=s == 0, last=s == n_stages - 1, **kwargs)
            for s, ids in enumerate(parts)]


def stage_block_ids(stage: Stage) -> list[int]:
    return sorted(int(i) for i in stage.stage_blocks)
