"""The pieces of a stage that runs the model's own forward (`Split.by_forward`, `bench.strategies.stages.Stage`):
a copy of the model sharing the stage's own submodules, its other blocks skipped, the received activation
swapped in at the stage's first block and the forward left after its last."""

from __future__ import annotations

import copy

import torch
from torch import nn


def hidden_of(out):
    """A block's output hidden states (a tuple's first element, as older Hugging Face layers return)."""
    return out[0] if isinstance(out, tuple) else out


class Cut(Exception):  # noqa: N818 (not an error: how a stage leaves the model's forward after its last block)
    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


class _Call:
    """How the model's forward meets one of its blocks in a stage: skipped (before the stage: the received
    activation replaces whatever reaches the stage's first block), entered (the received activation goes in
    instead), left (its output ends the stage) or plainly called. Attributes read through to the block, which
    the forward may consult (a Hugging Face layer's `attention_type`)."""

    def __init__(self, block: nn.Module, stage, role: str):
        self.block, self.stage, self.role = block, stage, role

    def __getattr__(self, name: str):
        return getattr(self.block, name)

    def __call__(self, *args, **kwargs):
        if self.role == "skip":
            return args[0] if args else kwargs["hidden_states"]
        if self.role in ("enter", "enter_leave"):
            received = self.stage.received
            args, kwargs = ((received, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": received})
        out = self.block(*args, **kwargs)
        if self.role in ("leave", "enter_leave"):
            raise Cut(hidden_of(out))
        return out


class StageBlocks(nn.Module):
    """A stage's blocks, registered under their indices in the whole model (so `layers.3.mlp.up.weight` keeps its
    name), seen by the model's forward as the whole list: the blocks of other stages as `_Call`s that skip."""

    def __init__(self, blocks: nn.ModuleList, ids: list[int], stage, first: bool, last: bool):
        super().__init__()
        for i in ids:
            self.add_module(str(i), blocks[i])
        roles = {}
        for i in range(len(blocks)):
            enter, leave = not first and i == ids[0], not last and i == ids[-1]
            roles[i] = ("enter_leave" if enter and leave else "enter" if enter else "leave" if leave
                        else "call" if i in ids else "skip")
        self.__dict__["calls"] = [_Call(blocks[i], stage, roles[i]) for i in range(len(blocks))]

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self):
        return iter(self.calls)

    def __getitem__(self, index):
        return self.calls[index]

    def values(self):
        return self._modules.values()


class Zeros(nn.Module):
    """A later stage's stand-in for a module before the blocks: what it returns is replaced at the stage's first
    block, so it needs only the shape (an embedding's (*ids, dim); any other module's, its input's)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.dim = module.embedding_dim if isinstance(module, nn.Embedding) else None

    def forward(self, x, *args, **kwargs):
        if self.dim is None:
            return x
        return torch.zeros(*x.shape, self.dim, device=x.device)


def _copy_module(module: nn.Module) -> nn.Module:
    """A shallow copy with its own registries: replacing a child of the copy leaves the original whole."""
    out = copy.copy(module)
    for registry in ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks"):
        setattr(out, registry, type(getattr(module, registry))(getattr(module, registry)))
    return out


def shell(model: nn.Module, replace: dict[str, nn.Module]) -> nn.Module:
    """`model` with the submodules at the paths of `replace` replaced: the modules on the way are copied, every
    other submodule is shared with `model`."""
    root, copied = _copy_module(model), {""}
    for path, module in replace.items():
        *parents, leaf = path.split(".")
        holder, prefix = root, ""
        for name in parents:
            prefix = f"{prefix}.{name}" if prefix else name
            if prefix not in copied:
                holder._modules[name] = _copy_module(holder._modules[name])
                copied.add(prefix)
            holder = holder._modules[name]
        holder._modules[leaf] = module
    return root
