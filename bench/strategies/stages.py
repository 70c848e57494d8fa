"""The model cut at block boundaries into stages: what `pipeline` (a stage per rank) and `modelparallel` (a
stage per device of one process) share.

Each stage is a small module that holds the full model's own submodules under the full model's attribute
paths (its blocks in an nn.ModuleDict keyed by their index), so a stage's parameters are named exactly as in
the single run (`blocks.3.fc.weight`) and parity can compare them one by one. Where the cut goes is the
model's to say (`PIPELINE_SPLIT` and `BLOCKS` in its module, see `bench.models`).
"""

from __future__ import annotations

import contextlib
import json

import torch
from torch import nn

from bench.errors import reject
from bench.models import (
    ModelSpec,
    Split,
    logits_of,
    meta_instance,
    model_blocks,
    model_label,
    model_spec,
)
from bench.strategies.forward_stage import Cut, StageBlocks, Zeros, hidden_of
from bench.strategies.forward_stage import shell as model_shell


def partition(n_blocks: int, n_stages: int) -> list[list[int]]:
    """Consecutive block indices per stage, as even as possible (earlier stages take the remainder)."""
    size, rest = divmod(n_blocks, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        end = start + size + (s < rest)
        out.append(list(range(start, end)))
        start = end
    return out


def bubble_fraction(idle_ratio: float) -> float:
    """Idle share of a step in the schedule's ideal timeline, from its idle time as a multiple of its compute r:
    r / (1 + r) (GPipe and 1F1B: (pp-1) / (m + pp-1))."""
    return idle_ratio / (1 + idle_ratio)


def check_splittable(cfg: dict, n_stages: int, key: str, got, hint: str = "") -> None:
    """The model declares its split and has at least one block per stage; else `key` (which set the number of
    stages, whose value is `got`) is the one to change."""
    spec = model_spec(cfg["model"])
    if spec.pipeline_split is None:
        reject("model", f"a model whose module defines PIPELINE_SPLIT (how its forward runs around its blocks) "
               f"with strategy={cfg['strategy']['name']}, which cuts it between its blocks", cfg["model"]["name"])
    model = meta_instance(cfg["model"])
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
    check_split(cfg, min(n_blocks, n_stages + 1), n_stages)


CHECKED_PARAMETERS = 20_000_000  # a model this small is checked at its own size: 80 MB and a moment on a CPU


def check_split(cfg: dict, n_blocks: int, n_stages: int) -> None:
    """The stages compute the model's forward: a small instance of the model (its `small_config` with `n_blocks`
    blocks, else the model itself when it has at most CHECKED_PARAMETERS), with real values on the CPU, run
    whole and stage by stage on one batch before any rank starts. Where they differ beyond float noise, or a
    stage fails, the run is refused: it would benchmark another model than the one named. A model larger than
    that without a `small_config` is not checked (bench's own models' splits call their forwards' own code)."""
    if split_unchecked(cfg):
        return
    spec = model_spec(cfg["model"])
    small = spec.small_config(cfg["model"], n_blocks) if spec.small_config else cfg["model"]
    label = model_label(cfg["model"])
    strategy = cfg["strategy"]["name"]
    try:
        difference = split_difference(small, n_stages)
    except Exception as exc:  # the model's own code, run stage by stage: whatever it raises, in one line
        reject("model", f"a model whose forward runs stage by stage with strategy={strategy}", label,
               f" ({type(exc).__name__} in a stage of a small instance: {str(exc).strip().splitlines()[-1]})")
    if difference > 1e-4:
        reject("model", f"a model whose stages compute its forward with strategy={strategy}", label,
               f" (its stages' logits differ from its forward's by {difference:.2g}, relative, on a small instance "
               "with real values: the forward does more around its blocks than the split runs)")


def split_unchecked(cfg: dict) -> str | None:
    """Why `check_split` cannot check this model's split (a row's warning), or None."""
    spec = model_spec(cfg["model"])
    if spec.small_config is not None or spec.pipeline_split is None:
        return None
    params = sum(p.numel() for p in meta_instance(cfg["model"]).parameters())
    if params <= CHECKED_PARAMETERS:
        return None
    return (f"pipeline split: not checked against the model's forward ({params / 1e6:.0f} M parameters, more than "
            f"the {CHECKED_PARAMETERS / 1e6:.0f} M run whole on the controller's CPU, and no small_config)")


def split_difference(model_cfg: dict, n_stages: int) -> float:
    """`_split_difference`, once per model config and number of stages in a process: a plan checks the split of
    each of its pipeline layouts (170 at 1,024 ranks of a 70B Llama took 10 s) and they share a few."""
    spec = model_spec(model_cfg)  # by the spec too: the same config names another model's code in tests
    key = (json.dumps(model_cfg, sort_keys=True, default=str), n_stages, id(spec))
    if key not in _SPLIT_DIFFERENCES:
        _SPLIT_DIFFERENCES[key] = spec, _split_difference(model_cfg, n_stages)  # the spec kept: its id not reused
    return _SPLIT_DIFFERENCES[key][1]


_SPLIT_DIFFERENCES: dict[tuple[str, int, int], tuple] = {}


def _split_difference(model_cfg: dict, n_stages: int) -> float:
    """max |stages(x) - model(x)| / max(1, max |model(x)|) on a batch of two, in eval mode (no dropout)."""
    spec = model_spec(model_cfg)
    torch.manual_seed(0)
    model = spec.build(model_cfg).eval()
    x, _ = spec.synthetic_batch(model_cfg, 2, torch.Generator().manual_seed(0))
    stages = build_stages(model, spec, n_stages)
    names = [name for stage in stages for name, _ in stage.named_parameters()]
    if sorted(names) != sorted(name for name, _ in model.named_parameters()):
        extra = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"parameters outside the blocks and the split's pre and post modules, on every stage: "
                         f"{', '.join(extra[:3])}")
    with torch.no_grad():
        expected = logits_of(model(x)).float()
        h = x
        for stage in stages:
            h = stage.eval()(h)
    if h.shape != expected.shape:
        return float("inf")
    return float((h.float() - expected).abs().max() / expected.abs().max().clamp(min=1.0))


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
    after them on the last), held under the full model's paths so parameter names match the single run.

    With a split by the model's own forward (`Split.by_forward`) the stage is a copy of the model that shares
    this stage's submodules and holds nothing of the others: it registers the copy's children as its own and
    runs the copy's forward. A later stage's input is the activation its predecessor sent."""

    def __init__(self, model: nn.Module, spec: ModelSpec, block_ids: list[int], first: bool, last: bool,
                 autocast_dtype: torch.dtype | None = None, device_type: str = "cpu"):
        super().__init__()
        self.split: Split = spec.pipeline_split
        self.first, self.last = first, last
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        self.blocks_path = spec.blocks
        self.received = None
        blocks = spec.blocks_of(model)
        if self.split.by_forward:
            replace = {spec.blocks: StageBlocks(blocks, block_ids, self, first, last)}
            replace.update({path: Zeros(model.get_submodule(path)) for path in (() if first else self.split.pre)})
            replace.update({path: nn.Identity() for path in (() if last else self.split.post)})
            shell = model_shell(model, replace)
            self._modules, self._parameters, self._buffers = shell._modules, shell._parameters, shell._buffers
            self.__dict__["shell"] = shell  # not a child: its children are this stage's own
            return
        for path in self.split.pre if first else ():
            _attach(self, path, model.get_submodule(path))
        _attach(self, spec.blocks, nn.ModuleDict({str(i): blocks[i] for i in block_ids}))
        for path in self.split.post if last else ():
            _attach(self, path, model.get_submodule(path))

    @property
    def stage_blocks(self) -> nn.Module:
        return self.get_submodule(self.blocks_path)

    def train(self, mode: bool = True) -> Stage:
        if "shell" in self.__dict__:
            self.shell.training = mode
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(self.device_type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            out = self._forward_by_model(x) if self.split.by_forward else self._forward_by_hand(x)
        # torch's pipelining sends with isend, which takes contiguous tensors only (a ViT's
        # flatten(2).transpose(1, 2) is not)
        return out.contiguous()

    def _forward_by_model(self, x: torch.Tensor) -> torch.Tensor:
        if not self.first:
            self.received, x = x, self.split.input_like(x)
        try:
            return logits_of(self.shell(x))
        except Cut as cut:
            return cut.hidden
        finally:
            self.received = None

    def _forward_by_hand(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.split.embed(self, x)
        for block in self.stage_blocks.values():
            x = hidden_of(block(x))
        if self.last:
            x = logits_of(self.split.head(self, x))
        return x


def build_stages(model: nn.Module, spec: ModelSpec, n_stages: int, **kwargs) -> list[Stage]:
    parts = partition(len(spec.blocks_of(model)), n_stages)
    return [Stage(model, spec, ids, first=s == 0, last=s == n_stages - 1, **kwargs)
            for s, ids in enumerate(parts)]


def stage_block_ids(stage: Stage) -> list[int]:
    return sorted(int(i) for i in stage.stage_blocks._modules)
