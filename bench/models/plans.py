"""What `hf` and `custom` read off a model they did not write: its blocks, its tensor-parallel plan in words,
the callables a config names."""

from __future__ import annotations

import fnmatch
import importlib
import weakref

import torch
from torch import nn

from bench.errors import reject


def find_blocks(model: nn.Module) -> str:
    """The attribute path of the model's repeated blocks: its nn.ModuleList holding the most parameters
    (a decoder's layers, not a list of two heads)."""
    lists = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m)}
    if not lists:
        raise ValueError("the model has no nn.ModuleList of repeated blocks")
    return max(lists, key=lists.get)


def _replicate_with_grad_all_reduce():
    from torch.distributed._functional_collectives import all_reduce
    from torch.distributed.tensor.parallel import ParallelStyle

    class ReplicateWithGradAllReduce(ParallelStyle):
        """A module whole on every tp rank that sees only its rank's share of a split layer's output (Qwen3's
        norm over each attention head's features): its gradients are summed over the tp ranks."""

        def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
            group = device_mesh.get_group()

            # At the first forward, not now: the parameters are still on the meta device here, and
            # materialising gives the module new Parameter objects, which would not carry the hooks.
            def hook_gradients(mod: nn.Module, args) -> None:
                for param in mod.parameters():
                    param.register_hook(lambda grad: all_reduce(grad, "sum", group))
                handle.remove()

            handle = module.register_forward_pre_hook(hook_gradients)
            return module

    return ReplicateWithGradAllReduce()


def parallel_style(name: str):
    """A tensor-parallel style by the name Hugging Face's plans (and `model.tp_plan`) use."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
        "replicated_with_grad_allreduce": _replicate_with_grad_all_reduce,
    }
    return styles[name]()


STYLES = ("colwise", "rowwise", "colwise_gather_output", "embedding_rowwise", "replicated_with_grad_allreduce")


def expand_plan(model: nn.Module, plan: dict[str, str], key: str) -> dict[str, str]:
    """`{module-name pattern: style}` (`*` matches any part, as in "layers.*.mlp.up") as `{module path: style}`,
    in the model's order. A pattern matching no module, or a style bench cannot apply, is refused naming `key`.
    Once per model and plan (a plan's checks ask of the same 80-layer model hundreds of times, 24 ms each)."""
    expanded = _EXPANDED.setdefault(model, {})
    asked = (tuple(plan.items()), key)
    if asked not in expanded:
        expanded[asked] = _expand_plan(model, plan, key)
    return dict(expanded[asked])


_EXPANDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _expand_plan(model: nn.Module, plan: dict[str, str], key: str) -> dict[str, str]:
    names = [name for name, _ in model.named_modules() if name]
    out = {}
    for pattern, style in plan.items():
        if style not in STYLES:
            reject(key, f"tensor-parallel styles among {', '.join(STYLES)}", f"{pattern}: {style}")
        matches = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            reject(key, "module-name patterns that match modules of the model", pattern)
        out.update(dict.fromkeys(matches, style))
    _refuse_split_tied(model, out, key)
    return out


def _refuse_split_tied(model: nn.Module, plan: dict[str, str], key: str) -> None:
    """A weight two modules share (a tied embedding and output layer) cannot be split by one of them: the plan
    would give that module a sharded copy and the model would train untied."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for leaf, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append(f"{name}.{leaf}" if name else leaf)
    for path in plan:
        for param in model.get_submodule(path)._parameters.values():
            if param is not None and len(holders[id(param)]) > 1:
                reject(key, "a plan that splits no weight two modules share (split by one, a tied weight is no longer "
                       "the other's: the model would train untied)", f"{path}: {' is '.join(holders[id(param)])}",
                       "; or untie them in the model")


def sequential(paths: tuple[str, ...]):
    """A split's `embed` or `head` that applies the submodules at `paths` in order."""

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for path in paths:
            x = m.get_submodule(path)(x)
        return x

    return run


def locate(path: str):
    """The object a dotted path names (`mypkg.nets.build`), as Hydra's `_target_` does; the ranks never
    import Hydra."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted path such as mypkg.nets.build")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attribute!r}") from None
