"""Hugging Face causal language models, built from their configs: `transformers.AutoConfig.for_model` with the
keyword arguments under `model.config` (`model_type: llama` and the architecture's sizes), then
`AutoModelForCausalLM.from_config`. No weights are downloaded and the hub is never asked (HF_HUB_OFFLINE=1):
the presets in conf/model/ (llama3-8b, llama3-70b, llama3.2-1b, qwen3-0.6b, mixtral-8x7b, gpt2, gpt2-xl)
hold the published architectures' sizes, and every key can be overridden (`model.config.num_hidden_layers=2`).

What the strategies need comes from the model itself: its blocks (the decoder layers), its tensor-parallel
plan (`model._tp_plan`: q/k/v/gate/up column-wise, o/down row-wise, embedding row-wise, LM head column-wise
with the logits gathered) and its own forward, which every pipeline stage runs (`PIPELINE_SPLIT`), checked
against the whole model on a small instance before a run (`small_config`). Sizes the architecture cannot train
with are refused before any rank starts. The loss is bench's own on the logits: the synthetic tokens are
already shifted, so no `labels` are passed.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn
from torch._guards import detect_fake_mode

from bench.configs import thaw
from bench.errors import ConfigError, positive_int, reject
from bench.models import Split, token_batch
from bench.models.plans import expand_plan, find_blocks, parallel_style

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers loads: a config never reaches for the hub


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError('model=hf (the Hugging Face presets) needs transformers, which is not installed here: '
                          'pip install -e ".[hf]"') from None
    transformers.logging.set_verbosity_error()  # its config warnings would repeat once per rank
    return transformers


def hf_config(cfg: dict):
    """The transformers config of the model config `cfg` (no cache: the model runs forward as in training), a copy
    of the one made once per config in a process (making one takes milliseconds, and a plan's checks ask for
    thousands)."""
    _transformers()  # refused where it is not installed, made or not
    key = json.dumps(cfg["config"], sort_keys=True, default=str)
    if key not in _CONFIGS:
        _CONFIGS[key] = _make_config(cfg)
    return copy.deepcopy(_CONFIGS[key])


_CONFIGS: dict = {}


def _make_config(cfg: dict):
    transformers = _transformers()
    kwargs = thaw(cfg["config"])  # transformers may standardise what it is given (rope_scaling) in place
    model_type = kwargs.pop("model_type", None)
    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        reject("model.config.model_type", "an architecture transformers knows (llama, qwen3, mixtral, gpt2, ...)",
               model_type)
    try:
        return transformers.AutoConfig.for_model(model_type, use_cache=False, **kwargs)
    except Exception as exc:  # transformers' own validation (ValueError, huggingface_hub's dataclass errors)
        reject("model.config", f"sizes a {model_type} config accepts ({_last_line(exc)})", cfg["config"])


def _last_line(exc: Exception) -> str:
    """The cause of a (possibly multi-line, chained) transformers error, in one line."""
    return str(exc).strip().splitlines()[-1].strip()


def build(cfg: dict) -> nn.Module:
    from bench.parallel.experts import balanced_when_simulated
    config, kwargs = hf_config(cfg), {}
    if experts(config) and detect_fake_mode() is not None:
        # on fake tensors grouped_mm has no fp32 kernel nor FLOP formula; batched_mm has both (stacked experts
        # run bench's balanced_forward there instead: `balanced_when_simulated`)
        kwargs["experts_implementation"] = "batched_mm"
    model = _transformers().AutoModelForCausalLM.from_config(config, **kwargs)
    balanced_when_simulated(model)
    return model


def experts(config) -> int | None:
    """The number of experts of a mixture-of-experts model (None for a dense one)."""
    return getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)


def meta_model(cfg: dict) -> nn.Module:
    """The model with its parameters on the meta device, built once per config (the strategies' facts)."""
    from bench.models import meta_instance

    config = hf_config(cfg)
    try:
        return meta_instance(cfg)
    except Exception as exc:  # whatever the architecture's constructor raises, in one line
        if "padding_idx" in str(exc).lower():  # every architecture's embedding pads at config.pad_token_id
            reject("model.config.pad_token_id", f"a token id below vocab_size={config.vocab_size} (the embedding's "
                   "padding index), or null", config.pad_token_id)
        reject("model.config", f"sizes transformers can build a {config.model_type} with ({_last_line(exc)})",
               cfg["config"])


def BLOCKS(cfg: dict) -> str:
    return find_blocks(meta_model(cfg))


def BLOCKS_KEY(cfg: dict) -> str:
    config = hf_config(cfg)
    return "model.config." + config.attribute_map.get("num_hidden_layers", "num_hidden_layers")


def INIT_STD(cfg: dict) -> float:
    return hf_config(cfg).initializer_range


def synthetic_batch(cfg: dict, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random tokens; the target is the input shifted by one (next-token prediction)."""
    return token_batch(hf_config(cfg).vocab_size, cfg["seq_len"], batch_size, gen)


def tokens_per_sample(cfg: dict) -> int:
    return cfg["seq_len"]


# --------------------------------------------------------------------------------------------------- checks


def tied(model: nn.Module) -> bool:
    """Whether the LM head's weight is the input embedding's (`tie_word_embeddings`)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def check(cfg: dict, needs: frozenset[str]) -> None:
    model_cfg = cfg["model"]
    defaults = hf_config({"config": {"model_type": model_cfg["config"].get("model_type")}})
    # A key the config class does not take stays on it as a plain extra attribute; one it takes (even a legacy
    # one it converts, like rope_theta into rope_parameters) does not.
    extras = set(hf_config(model_cfg).to_dict()) - set(defaults.to_dict()) - set(defaults.attribute_map)
    for key in model_cfg["config"]:
        if key in extras:
            reject(f"model.config.{key}", f"a key {type(defaults).__name__} takes", key)
    positive_int(cfg, "model.seq_len")
    _check_sizes(hf_config(model_cfg))
    limit = getattr(hf_config(model_cfg), "max_position_embeddings", None)
    if limit is not None and model_cfg["seq_len"] > limit:
        reject("model.seq_len", f"at most max_position_embeddings={limit}", model_cfg["seq_len"],
               "; or raise model.config.max_position_embeddings")
    model = meta_model(model_cfg)
    if "tp_plan" in needs:
        _check_tensor_parallel(cfg, model, needs)


def _check_sizes(config) -> None:
    """What every decoder needs of its sizes, which transformers builds without (and the ranks then fail on)."""

    def key(name: str) -> str:
        return "model.config." + config.attribute_map.get(name, name)

    for name in ("num_hidden_layers", "vocab_size", "hidden_size", "num_attention_heads"):
        value = getattr(config, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            reject(key(name), "a positive integer", value)
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if isinstance(kv, int) and (kv < 1 or heads % kv):
        reject(key("num_key_value_heads"), f"a divisor of num_attention_heads={heads} (each key/value head serves "
               "an equal group of query heads)", kv)


def _check_tensor_parallel(cfg: dict, model: nn.Module, needs: frozenset[str]) -> None:
    name = cfg["model"].get("preset") or cfg["model"]["config"]["model_type"]
    if not getattr(model, "_tp_plan", None):
        reject("model", "a Hugging Face architecture that ships a tensor-parallel plan (llama, qwen3, mistral, ...) "
               f"with tensor parallelism: {name} has none", name, "; or pick a strategy that does not split its layers")
    if tied(model):
        reject("model.config.tie_word_embeddings", "false with tensor parallelism (the embedding is split by rows "
               "and the LM head by columns: one shared weight cannot be both)", True)
    expand_plan(model, model._tp_plan, "model")
    if "sharded_tp_plan" in needs and "replicated_with_grad_allreduce" in model._tp_plan.values():
        strategy = cfg["strategy"]["name"]
        reject("parallel.tp", f"1 with strategy={strategy} for {name} (its plan keeps per-head norms whole and sums "
               f"their gradients over the tp ranks, which {strategy}'s sharded parameters do not carry)",
               cfg["parallel"]["tp"], "; or use a strategy that does not shard the parameters")


# ------------------------------------------------------------------------------------------------ strategies


def tp_plan(cfg: dict, sequence_parallel: bool) -> dict:
    """The model's own plan (`model._tp_plan`), its patterns expanded and its styles as DTensor's."""
    model = meta_model(cfg)
    return {path: parallel_style(style) for path, style in expand_plan(model, model._tp_plan, "model").items()}


def tp_split_sizes(cfg: dict) -> dict[str, int]:
    config = hf_config(cfg)
    sizes = {"num_attention_heads": config.num_attention_heads, "vocab_size": config.vocab_size}
    for key in ("num_key_value_heads", "intermediate_size"):
        if getattr(config, key, None):
            sizes[key] = getattr(config, key)
    return {f"model.config.{key}": size for key, size in sizes.items()}


def context_parallel(model: nn.Module, context) -> None:
    """Run on this rank's share of each sequence: bench's attention through transformers' attention interface
    (`bench.parallel.context.hf_context_parallel`)."""
    from bench.parallel.context import hf_context_parallel

    hf_context_parallel(model, context)


def PIPELINE_SPLIT(cfg: dict) -> Split:
    """Cut by the model's own forward (`Split.by_forward`): the modules with parameters before its layers (the
    embeddings) on the first stage, those after them (the final norm, the LM head) on the last. That the
    forward then runs the same on stages is checked on a small instance before any rank starts
    (`bench.strategies.stages.check_split`)."""
    model = meta_model(cfg)
    blocks = find_blocks(model)
    pre, post, seen = [], [], False
    for path, module in model.named_modules():
        if path == blocks:
            seen = True
        inside = path.startswith(f"{blocks}.") or blocks.startswith(f"{path}.") or path == blocks
        if inside or not path or any(path.startswith(f"{p}.") for p in pre + post):
            continue
        if any(True for _ in module.parameters()):
            (post if seen else pre).append(path)
    return Split(pre=tuple(pre), post=tuple(post), input_like=_token_ids_like)


# The widths of a small instance (`small_config`), by the config keys transformers' architectures use.
SMALL_SIZES = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 256, "num_attention_heads": 4,
               "head_dim": 16, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
               "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
               "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "q_lora_rank": 32, "kv_lora_rank": 16,
               "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}
SMALL_PARAMETERS = 20_000_000
SMALL_SEQ_LEN = 64


def with_blocks(cfg: dict, n_blocks: int) -> dict:
    """The same architecture with `n_blocks` layers; per-layer lists (layer_types) cut to as many."""
    config = hf_config(cfg)
    kwargs = thaw(cfg["config"])
    kwargs[config.attribute_map.get("num_hidden_layers", "num_hidden_layers")] = n_blocks
    for key, value in list(kwargs.items()):
        if isinstance(value, list) and len(value) == config.num_hidden_layers:
            kwargs[key] = value[:n_blocks]
    return {**thaw(cfg), "config": kwargs}


def small_config(cfg: dict, n_blocks: int) -> dict:
    """The same architecture with `n_blocks` layers, a sequence of at most SMALL_SEQ_LEN and, where that still
    holds more than SMALL_PARAMETERS, the widths of SMALL_SIZES (grouped-query attention kept grouped)."""
    config = hf_config(cfg)
    small = {**with_blocks(cfg, n_blocks), "seq_len": min(cfg["seq_len"], SMALL_SEQ_LEN)}
    kwargs = small["config"]
    if sum(p.numel() for p in meta_model(small).parameters()) <= SMALL_PARAMETERS:
        return small
    for key, size in SMALL_SIZES.items():
        name = config.attribute_map.get(key, key)
        if getattr(config, name, None) is not None:
            kwargs[name] = size
    kv = getattr(config, "num_key_value_heads", None)
    if kv is not None:
        kwargs["num_key_value_heads"] = 2 if kv < config.num_attention_heads else SMALL_SIZES["num_attention_heads"]
    return small


def _token_ids_like(hidden: torch.Tensor) -> torch.Tensor:
    return torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)


# ----------------------------------------------------------------------------------------------------- FLOPs

FLOPS_CONVENTION = (
    "6NT + 12LT^2d (PaLM, Megatron-LM, nanoGPT, torchtitan): N the weights of the matmuls a token passes through "
    "(the decoder layers' matrices, a mixture of experts' at top-k / experts, the LM head; embeddings and norms "
    "excluded), T tokens per sample, L layers, d the attention width (heads x head dim); attention over the full "
    "T x T square (causal masking not discounted; model_flops_causal_per_step halves it); recompute not counted"
)


def model_flops_per_sample(cfg: dict, causal: bool = False) -> float:
    """As the GPT's (`bench.models.gpt`), with the model's weights counted from its meta-device build."""
    model, config = meta_model(cfg), hf_config(cfg)
    active = config.num_experts_per_tok / experts(config) if experts(config) else 1.0
    weights = 0.0
    for name, p in model.get_submodule(find_blocks(model)).named_parameters():
        if p.dim() >= 2:
            weights += p.numel() * (active if ".experts." in name else 1.0)
    weights += model.get_output_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    t, layers = cfg["seq_len"], config.num_hidden_layers
    attention = (6.0 if causal else 12.0) * layers * t * t * config.num_attention_heads * head_dim
    return 6.0 * weights * t + attention
