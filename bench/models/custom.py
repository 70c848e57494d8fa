"""Your own model: `model.module._target_` names any callable that returns an nn.Module (Hydra's `_target_`
convention; the other keys under `model.module` are its keyword arguments), `model.inputs` the synthetic batch
it trains on, and the rest what the strategies need to know about it:

- `model.blocks`: the attribute path of its repeated blocks, which FSDP shards one by one, activation
  checkpointing and compile wrap, and pipeline and modelparallel cut between (null: its nn.ModuleList holding
  the most parameters);
- `model.tp_plan`: `{module-name pattern: style}` for strategy=tensor (`colwise`, `rowwise`,
  `colwise_gather_output`, `embedding_rowwise`, `replicated_with_grad_allreduce`; `*` matches any name part);
- `model.split`: the modules before the blocks (`pre`, on the first stage) and after them (`post`, on the
  last) for strategy=pipeline and modelparallel, applied in order, or through `embed` / `head` functions
  `(module, x) -> y` named by dotted path where the forward is more than a sequence;
- `model.init_std`: the normal distribution's standard deviation for every matrix (null: U(+-1/sqrt(fan_in))).

The module must be importable where bench runs (on PYTHONPATH, or installed). Like every model it is built on
the meta device and materialised by bench's initialisation rule (`bench.models.init`).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping

import torch
from torch import nn

from bench.configs import thaw
from bench.errors import reject
from bench.models import Split, logits_of, token_batch
from bench.models.plans import expand_plan, find_blocks, locate, parallel_style, sequential

INPUT_KINDS = ("tokens", "dense")


def build(cfg: dict) -> nn.Module:
    kwargs = {key: value for key, value in thaw(cfg["module"]).items() if key != "_target_"}
    return locate(cfg["module"]["_target_"])(**kwargs)


def synthetic_batch(cfg: dict, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (next-token targets, already shifted), dense features with a class each, or the user's own
    function's batch."""
    inputs = cfg["inputs"]
    if inputs.get("_target_"):
        return locate(inputs["_target_"])(batch_size, gen)
    if inputs["kind"] == "tokens":
        return token_batch(inputs["vocab_size"], inputs["seq_len"], batch_size, gen)
    x = torch.randn(batch_size, *inputs["shape"], generator=gen)
    return x, torch.randint(0, inputs["classes"], (batch_size,), generator=gen)


def tokens_per_sample(cfg: dict) -> int | None:
    inputs = cfg["inputs"]
    return inputs["seq_len"] if inputs["kind"] == "tokens" and not inputs.get("_target_") else None


def _meta(cfg: dict) -> nn.Module:
    """The model with its parameters on the meta device, built once: what the strategies' facts are read from."""
    from bench.models import meta_instance

    return meta_instance(cfg)


def BLOCKS(cfg: dict) -> str:
    return cfg["blocks"] or find_blocks(_meta(cfg))


def INIT_STD(cfg: dict) -> float | None:
    return cfg["init_std"]


def PIPELINE_SPLIT(cfg: dict) -> Split | None:
    split = cfg["split"]
    if not split or not (split.get("pre") or split.get("post")):
        return None
    pre, post = tuple(split.get("pre") or ()), tuple(split.get("post") or ())
    embed = locate(split["embed"]) if split.get("embed") else sequential(pre)
    head = locate(split["head"]) if split.get("head") else sequential(post)
    return Split(pre=pre, embed=embed, post=post, head=head)


def tp_plan(cfg: dict, sequence_parallel: bool) -> dict:
    plan = expand_plan(_meta(cfg), cfg["tp_plan"] or {}, "model.tp_plan")
    return {path: parallel_style(style) for path, style in plan.items()}


# ---------------------------------------------------------------------------------------------------- checks


def check(cfg: dict, needs: frozenset[str]) -> None:
    model_cfg = cfg["model"]
    target = model_cfg["module"].get("_target_")
    try:
        builder = locate(str(target))
    except ImportError as exc:
        reject("model.module._target_", f"the dotted path of a callable returning an nn.Module, importable from "
               f"here ({exc})", target, "; or put its package on PYTHONPATH")
    model = _built_in_time(model_cfg, target)
    if not isinstance(model, nn.Module):
        reject("model.module._target_", "a callable returning an nn.Module", f"{builder} returning {type(model)}")
    _check_inputs(model_cfg["inputs"])
    _check_output(model, model_cfg, target)
    blocks = model_cfg["blocks"]
    try:
        found = model.get_submodule(BLOCKS(model_cfg))
    except (AttributeError, ValueError) as exc:
        reject("model.blocks", f"the attribute path of the model's nn.ModuleList of repeated blocks ({exc})", blocks)
    if not isinstance(found, nn.ModuleList):
        reject("model.blocks", "the path of an nn.ModuleList", f"{blocks} ({type(found).__name__})")
    split = PIPELINE_SPLIT(model_cfg)
    if split is None and "pipeline_split" in needs:
        reject("model.split", f"the modules before and after the blocks with strategy={cfg['strategy']['name']}, "
               "which cuts the model between them, e.g. model.split={pre:[embed],post:[norm,out]}", None)
    for path in (split.pre + split.post) if split else ():
        if path not in dict(model.named_modules()):
            reject("model.split", "submodule paths of the model in pre and post", path)
    if "tp_plan" in needs:
        if not model_cfg["tp_plan"]:
            reject("model.tp_plan", "a tensor-parallel plan ({module-name pattern: colwise | rowwise | ...}) with "
                   "tensor parallelism", None)
        expand_plan(model, model_cfg["tp_plan"], "model.tp_plan")


BUILD_TIMEOUT_S = 300.0  # a constructor on the meta device allocates nothing: minutes mean it does other work
BUILD_NOTICE_S = 2.0  # a build slower than this is announced, so the wait is not silent


def _built_in_time(model_cfg: dict, target: str) -> nn.Module:
    """The user's constructor, run once (`meta_instance` keeps what it built), in a thread the controller waits on
    for at most BUILD_TIMEOUT_S: whatever it raises, or `sys.exit` in it, is one line, not the controller's end."""
    outcome: dict = {}

    def build_it() -> None:
        try:
            outcome["model"] = _meta(model_cfg)
        except BaseException as exc:  # noqa: BLE001 (SystemExit included: the user's code ends nothing here)
            outcome["error"] = exc

    thread = threading.Thread(target=build_it, name="bench-build-model", daemon=True)
    thread.start()
    thread.join(BUILD_NOTICE_S)
    if thread.is_alive():
        print(f"bench: building the model ({target}) on the meta device, waiting at most {BUILD_TIMEOUT_S:.0f} s",
              file=sys.stderr, flush=True)
        thread.join(BUILD_TIMEOUT_S - BUILD_NOTICE_S)
    if thread.is_alive():
        reject("model.module._target_", f"a constructor that returns within {BUILD_TIMEOUT_S:.0f} s on the meta "
               "device", target)
    if "error" in outcome:
        exc = outcome["error"]
        reject("model.module", f"keyword arguments {target} accepts and a constructor that returns "
               f"({type(exc).__name__}: {exc})", {k: v for k, v in model_cfg["module"].items() if k != "_target_"})
    return outcome["model"]


def _check_output(model: nn.Module, model_cfg: dict, target: str) -> None:
    """The forward returns what bench's loss takes: logits, or an output or dict holding them under `logits`.
    Run on the meta device (nothing allocated); a forward that cannot run there is left to the ranks to try."""
    x, _ = synthetic_batch(model_cfg, 1, torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = model(x.to("meta"))
    except Exception:
        return
    if not isinstance(logits_of(out), torch.Tensor):
        got = f"{type(out).__name__} with keys {list(out)}" if isinstance(out, Mapping) else type(out).__name__
        reject("model.module._target_", "a model whose forward returns logits: a tensor, or an output or dict "
               "holding them under `logits` (bench's loss is cross-entropy on them)", f"{target} returning {got}")


def _check_inputs(inputs: dict) -> None:
    if inputs.get("_target_"):
        try:
            locate(inputs["_target_"])
        except ImportError as exc:
            reject("model.inputs._target_", f"the dotted path of a function (batch_size, generator) -> (inputs, "
                   f"targets) ({exc})", inputs["_target_"])
        return
    if inputs["kind"] not in INPUT_KINDS:
        reject("model.inputs.kind", f"one of {', '.join(INPUT_KINDS)} (or set model.inputs._target_)", inputs["kind"])
    needed = ("vocab_size", "seq_len") if inputs["kind"] == "tokens" else ("classes",)
    for key in needed:
        value = inputs.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            reject(f"model.inputs.{key}", f"a positive integer with model.inputs.kind={inputs['kind']}", value)
    shape = inputs.get("shape")
    if inputs["kind"] == "dense" and (not shape or not all(isinstance(n, int) and n > 0 for n in shape)):
        reject("model.inputs.shape", "the shape of one sample's features, e.g. [512] or [3,32,32]", shape)
