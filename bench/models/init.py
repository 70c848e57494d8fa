"""Models built on the meta device and materialised where they live.

Every rank builds the model with its parameters on the meta device (no memory, no initialisation cost) and its
buffers real: a Hugging Face rotary embedding computes its frequencies when it is built, and they could not be
recomputed from meta tensors. The strategy shards or splits the meta model; then `materialize` allocates the
parameters this rank holds, on its device, and fills them.

The values depend on the seed, the parameter's name and its full shape alone, so every layout of a parameter
(whole, an FSDP shard, a tensor-parallel slice, a pipeline stage) holds the values the single-device build holds:
`verify=true` parity compares like with like. They are drawn in blocks of rows (the last dimension is a row),
each block from its own generator seeded by (seed, name, block index), so a shard draws only the blocks it
overlaps and no rank ever holds a whole parameter it does not own: a 128k x 2k embedding is drawn 1M values at a
time, not in one 1 GB tensor.

The rule (`init_rule`): a matrix (2-D or more) is drawn from N(0, std) where the model gives `INIT_STD` (the
GPT's 0.02, a Hugging Face config's `initializer_range`), else from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as
PyTorch's nn.Linear and nn.Conv draw theirs; a vector or scalar is a bias (zeros, when its name says `bias`) or
a norm's scale (ones). It is bench's rule, not the model's own `__init__`: per-layer variations of a model
(GPT-2's scaled residual projections) are not reproduced.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

BLOCK_VALUES = 2**20  # values drawn per generator (rows of the last dimension, at least one row)


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device and their buffers where they are made (as
    accelerate's `init_empty_weights(include_buffers=False)`): every parameter is moved to meta as it is
    registered, so a layer's own initialisation runs on meta tensors and costs nothing."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def init_rule(name: str, shape: torch.Size, std: float | None) -> Callable[[torch.Tensor, torch.Generator], None]:
    """How parameter `name` of full shape `shape` is filled in place: see the module's docstring."""
    if len(shape) < 2:
        value = 0.0 if "bias" in name.rsplit(".", 1)[-1] else 1.0
        return lambda t, g: t.fill_(value)
    if std is not None:
        return lambda t, g: t.normal_(0.0, std, generator=g)
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return lambda t, g: t.uniform_(-bound, bound, generator=g)


def _generator(device: torch.device, seed: int, name: str, block: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def draw(name: str, full_shape: torch.Size, offset: tuple[int, ...], local_shape: tuple[int, ...], seed: int,
         std: float | None, device: torch.device) -> torch.Tensor:
    """The values of the box `offset : offset + local_shape` of parameter `name` (full shape `full_shape`)."""
    out = torch.empty(local_shape, device=device)
    draw_into(out, name, full_shape, offset, seed, std)
    return out


def draw_into(out: torch.Tensor, name: str, full_shape: torch.Size, offset: tuple[int, ...], seed: int,
              std: float | None) -> None:
    """Write the values of the box `offset : offset + out.shape` of parameter `name` into `out` (contiguous),
    one block of rows at a time: no temporary larger than a block."""
    fill, device = init_rule(name, full_shape, std), out.device
    if len(full_shape) < 2:  # a constant: nothing to draw
        fill(out, None)
        return
    width, local_shape = full_shape[-1], tuple(out.shape)
    rows_per_block = max(1, BLOCK_VALUES // width)
    n_rows = math.prod(full_shape[:-1])
    # the flat row index (over all dimensions but the last) of every row of the box, in row-major order
    strides = [math.prod(full_shape[i + 1 : -1]) for i in range(len(full_shape) - 1)]
    ranges = (torch.arange(o, o + n) for o, n in zip(offset[:-1], local_shape[:-1], strict=True))
    grids = torch.meshgrid(*ranges, indexing="ij")
    rows = sum(grid * stride for grid, stride in zip(grids, strides, strict=True)).reshape(-1)
    columns = slice(offset[-1], offset[-1] + local_shape[-1])
    out = out.view(len(rows), local_shape[-1])
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # one run of rows (whole, or split along dim 0)
        start, stop = int(rows[0]), int(rows[-1]) + 1
        for block in range(start // rows_per_block, (stop - 1) // rows_per_block + 1):
            first = block * rows_per_block
            values = torch.empty(min(rows_per_block, n_rows - first), width, device=device)
            fill(values, _generator(device, seed, name, block))
            lo, hi = max(start, first), min(stop, first + len(values))
            out[lo - start : hi - start] = values[lo - first : hi - first, columns]
        return
    blocks = rows // rows_per_block
    for block in torch.unique(blocks).tolist():
        first = block * rows_per_block
        values = torch.empty(min(rows_per_block, n_rows - first), width, device=device)
        fill(values, _generator(device, seed, name, block))
        mine = (blocks == block).nonzero().squeeze(1)
        out[mine.to(device)] = values[(rows[mine] - first).to(device), columns]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor, without importing DTensor's module where nothing has: then no tensor can be
    one, and a rank of a strategy that has none (single, DDP) does not pay the import (0.67 s of its start here)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _box(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(offset, shape) of this rank's part of `param` in the full tensor, or None where it is not one box."""
    if not is_dtensor(param):
        return (0,) * param.dim(), tuple(param.shape)
    from torch.distributed.tensor import Replicate, Shard

    if not all(type(p) in (Shard, Replicate) for p in param.placements):
        return None  # FSDP's _StridedShard under 2-D, Partial: no single box
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(offset), tuple(shape)


@torch.no_grad()
def fill_parameter(param: torch.Tensor, name: str, seed: int, std: float | None) -> None:
    """Fill this rank's part of `param` (a plain tensor or a DTensor), drawing only what it holds."""
    local = param.to_local() if is_dtensor(param) else param
    box = _box(param)
    if box is not None and local.is_contiguous():  # written in place, block by block
        draw_into(local, name, param.shape, box[0], seed, std)
        return
    if box is not None:
        local.copy_(draw(name, param.shape, *box, seed, std, local.device))
        return
    from torch.distributed.tensor import distribute_tensor

    whole = draw(name, param.shape, (0,) * param.dim(), tuple(param.shape), seed, std, local.device)
    local.copy_(distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local())


def _tied_places(module: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Every parameter held by more than one (submodule, name) place, as the list of its places."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                places.setdefault(id(param), []).append((sub, name))
    return [where for where in places.values() if len(where) > 1]


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device | str, seed: int, std: float | None) -> nn.Module:
    """Allocate `module`'s parameters on `device` (this rank's shards only, where they are DTensors) and fill
    them by bench's rule; its buffers keep their values. Parameter names are read from `module` itself, so it
    must name them as the whole model does (the model, or a pipeline stage holding the model's own paths)."""
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    tied = _tied_places(module)
    module.to_empty(device=device)
    # A meta parameter cannot take real storage in place: to_empty gives each module holding it a new
    # Parameter of its own, which unties an LM head from its embedding (GPT-2's, Llama 3.2's). Tie them again.
    for (owner, name), *others in tied:
        for module_, name_ in others:
            module_._parameters[name_] = owner._parameters[name]
    for name, b in module.named_buffers():
        b.copy_(buffers[name])
    if is_fake(next(module.parameters(), torch.empty(0))):
        return module  # a rank simulated on fake tensors (`bench.plan`) has shapes, no values to draw
    for name, param in module.named_parameters():
        fill_parameter(param, name, seed, std)
    return module
