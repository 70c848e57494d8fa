"""GPT-style decoder (nanoGPT layout): token + position embeddings, pre-norm blocks with causal
`F.scaled_dot_product_attention` and a GELU MLP, final norm, untied LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.models import Split, token_batch
from bench.models.moe import MoE


class Attention(nn.Module):
    context = None  # a ContextGroup when the sequence is split over ranks (`context_parallel`)

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 rather than d_model // n_heads: under tensor parallelism each rank holds a slice of the heads.
        q, k, v = (lin(x).view(b, t, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        if self.context is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = self.context.attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))

    @property
    def head_dim(self) -> int:
        return self.q.in_features // self.n_heads


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, experts: int = 0, top_k: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        hidden = mlp_ratio * d_model
        self.ff = MoE(d_model, hidden, experts, top_k) if experts else FeedForward(d_model, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class GPT(nn.Module):
    context = None  # as Attention's

    def __init__(self, vocab_size: int = 512, seq_len: int = 64, d_model: int = 128, n_layers: int = 2,
                 n_heads: int = 4, mlp_ratio: int = 4, experts: int = 0, top_k: int = 2):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio, experts, top_k) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = embed(self, idx)
        for block in self.blocks:
            x = block(x)
        return logits(self, x)


def embed(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Token plus position embeddings (`m`: the model, or the pipeline stage that holds them); a
    context-parallel rank's tokens at its own positions."""
    t, context = idx.shape[1], getattr(m, "context", None)
    positions = torch.arange(t, device=idx.device) if context is None else context.positions(t, idx.device)
    return m.tok_emb(idx) + m.pos_emb(positions)


def logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.head(m.norm(x))


def context_parallel(model: GPT, context) -> None:
    """Run on this rank's share of each sequence (`bench.parallel.context`): position embeddings of its own
    positions, every attention over the whole sequence's keys and values."""
    for module in model.modules():
        if isinstance(module, (GPT, Attention)):
            module.context = context


def check(cfg: dict, needs: frozenset[str]) -> None:
    from bench.errors import positive_int, reject

    for key in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio", "top_k"):
        if key in cfg["model"]:  # a row written before the mixture of experts has no top_k: still a dense GPT
            positive_int(cfg, f"model.{key}")
    model = cfg["model"]
    if model["d_model"] % model["n_heads"]:
        reject("model.d_model", f"a multiple of model.n_heads={model['n_heads']} (each head takes d_model / n_heads)",
               model["d_model"], "; or change model.n_heads")
    experts, top_k = model.get("experts", 0), model.get("top_k", 2)
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 0:
        reject("model.experts", "0 (a dense feed-forward) or the number of experts of each block's", experts)
    if experts and top_k > experts:
        reject("model.top_k", f"the experts each token is sent to, 1 to model.experts={experts}", top_k)


def build(cfg: dict) -> GPT:
    if cfg["d_model"] % cfg["n_heads"]:
        raise ValueError(f"model.d_model={cfg['d_model']} must be divisible by model.n_heads={cfg['n_heads']}")
    return GPT(cfg["vocab_size"], cfg["seq_len"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["mlp_ratio"],
               cfg.get("experts", 0), cfg.get("top_k", 2))


def synthetic_batch(cfg: dict, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random tokens; the target is the input shifted by one (next-token prediction)."""
    return token_batch(cfg["vocab_size"], cfg["seq_len"], batch_size, gen)


def small_config(cfg: dict, n_blocks: int) -> dict:
    """The same GPT with `n_blocks` blocks of width 32 on 16 tokens: its pipeline split checked in a moment."""
    return {**cfg, "vocab_size": 64, "seq_len": min(cfg["seq_len"], 16), "d_model": 32, "n_heads": 2,
            "n_layers": n_blocks}


BLOCKS_KEY = "model.n_layers"
INIT_STD = 0.02  # nanoGPT's and GPT-2's: every matrix ~ N(0, 0.02), drawn by bench.models.init
PIPELINE_SPLIT = Split(pre=("tok_emb", "pos_emb"), embed=embed, post=("norm", "head"), head=logits)
SEQUENCE_PARALLEL = True


def tp_plan(cfg: dict, sequence_parallel: bool) -> dict:
    """Megatron-style: q, k, v and the FFN's up projection column-wise (each rank keeps n_heads/tp heads and
    hidden/tp units), the attention output and FFN down projection row-wise, the LM head column-wise with
    the logits gathered. With sequence parallelism the residual stream between blocks stays split along the
    sequence: norms run on their shard, each attention/FFN all-gathers its input and reduce-scatters its
    output. A mixture of experts stays whole on each tp rank, as Mixtral's own plan leaves it (its experts are
    split by `parallel.ep`): it takes the whole sequence and, under sequence parallelism, keeps its shard."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    out = Shard(1) if sequence_parallel else Replicate()
    plan = {"head": ColwiseParallel(input_layouts=out, output_layouts=Replicate())}
    if sequence_parallel:
        # the residual stream enters the first block whole and stays a local sequence shard from there on
        plan["blocks.0"] = PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
        )
        plan["norm"] = SequenceParallel()
    dense = not cfg.get("experts", 0)
    for i in range(cfg["n_layers"]):
        block = f"blocks.{i}"
        for name in ("attn.q", "attn.k", "attn.v") + (("ff.up",) if dense else ()):
            plan[f"{block}.{name}"] = ColwiseParallel()
        plan[f"{block}.attn.proj"] = RowwiseParallel(output_layouts=out)
        if dense:
            plan[f"{block}.ff.down"] = RowwiseParallel(output_layouts=out)
        if sequence_parallel:
            plan[f"{block}.norm1"] = SequenceParallel()
            plan[f"{block}.norm2"] = SequenceParallel()
            plan[f"{block}.attn"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            plan[f"{block}.ff"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            if not dense:  # every tp rank computes the same experts' output on the whole sequence, keeps its shard
                plan[f"{block}.ff"] = PrepareModuleInputOutput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                    output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),))
    return plan


def tp_split_sizes(cfg: dict) -> dict[str, int]:
    return {
        "model.n_heads": cfg["n_heads"],
        "model.vocab_size": cfg["vocab_size"],
    } | ({} if cfg.get("experts", 0) else {"model.mlp_ratio*model.d_model": cfg["mlp_ratio"] * cfg["d_model"]})


def tokens_per_sample(cfg: dict) -> int | None:
    return cfg["seq_len"]


FLOPS_CONVENTION = (
    "6NT + 12LT^2d (PaLM, Megatron-LM, nanoGPT, torchtitan): N the weights of the matmuls (attention, feed-forward "
    "(a mixture of experts': its router and the top-k experts a token passes through), LM head; embeddings and norms "
    "excluded), T tokens per sample, L layers, d model width; attention over the full "
    "T x T square (causal masking not discounted; model_flops_causal_per_step halves it); recompute not counted"
)


def model_flops_per_sample(cfg: dict, causal: bool = False) -> float:
    """Forward 2 FLOPs per weight per token and backward twice that (6NT), plus attention: QK^T and AV take
    2T^2d each forward over the full square, 6 x 2T^2d per layer for training; `causal`: half of that."""
    d, layers, t, experts = cfg["d_model"], cfg["n_layers"], cfg["seq_len"], cfg.get("experts", 0)
    # a mixture of experts: the router, and the gated MLPs of the top k experts a token passes through
    feed_forward = d * experts + cfg.get("top_k", 2) * 3 * d * cfg["mlp_ratio"] * d if experts else \
        2 * d * cfg["mlp_ratio"] * d
    matmul_weights = layers * (4 * d * d + feed_forward) + d * cfg["vocab_size"]
    return 6.0 * matmul_weights * t + (6.0 if causal else 12.0) * layers * t * t * d
