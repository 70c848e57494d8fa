"""Users' models shrunk to a few hundred KB: Hugging Face architectures from their configs (a Llama, a GPT-2, a
Mixtral mixture of experts, a Qwen3) and a module from outside the project (`tests/yournet.py`, model=custom), as
config overrides, for tests/unit/test_your_model.py and tests/integration/test_your_model_runs.py."""

LLAMA = {"model": "hf", "model.seq_len": 16}  # conf/model/hf.yaml: a 2-layer Llama of width 64
GPT2 = {"model": "gpt2", "model.seq_len": 16, "model.config.vocab_size": 128, "model.config.n_embd": 32,
        "model.config.n_layer": 2, "model.config.n_head": 2, "model.config.n_positions": 32}
MIXTRAL = {"model": "mixtral-8x7b", "model.seq_len": 16, "model.config.vocab_size": 128,
           "model.config.hidden_size": 32, "model.config.intermediate_size": 32, "model.config.num_hidden_layers": 2,
           "model.config.num_attention_heads": 4, "model.config.num_key_value_heads": 2,
           "model.config.num_local_experts": 4}
QWEN3 = {"model": "qwen3-0.6b", "model.seq_len": 16, "model.config.vocab_size": 128, "model.config.hidden_size": 32,
         "model.config.intermediate_size": 64, "model.config.num_hidden_layers": 2,
         "model.config.num_attention_heads": 4, "model.config.num_key_value_heads": 2, "model.config.head_dim": 8,
         "model.config.tie_word_embeddings": False}
YOURNET = {"model": "custom", "model.module": {"_target_": "yournet.build", "vocab": 64, "width": 32, "depth": 2},
           "model.inputs": {"kind": "tokens", "vocab_size": 64, "seq_len": 16}, "model.init_std": None,
           "model.tp_plan": {"layers.*.up": "colwise", "layers.*.down": "rowwise"},
           "model.split": {"pre": ["embed"], "post": ["norm", "out"]}}
UNTIED = {"model.config.tie_word_embeddings": False}

# Architectures no other test uses, as a new user would write them (tiny): each must train under every strategy or
# be refused before launch, never run as another model (granite's multipliers, gemma2's soft-cap and eager
# attention, mistral's sliding window shorter than the sequence, gemma3's per-layer rotary embeddings).
HELD_OUT_BASE = {"model": "hf", "model.seq_len": 32, "model.config.vocab_size": 128, "model.config.hidden_size": 64,
                 "model.config.intermediate_size": 128, "model.config.num_hidden_layers": 4,
                 "model.config.num_attention_heads": 4, "model.config.num_key_value_heads": 2}
HELD_OUT = {
    "mistral": {"+model.config.sliding_window": 8},
    "gemma2": {"+model.config.head_dim": 16, "+model.config.attn_implementation": "eager"},
    "gemma3_text": {"+model.config.head_dim": 16},
    "phi3": {"+model.config.pad_token_id": 0},
    "olmo2": {},
    "qwen2_moe": {"+model.config.moe_intermediate_size": 32, "+model.config.shared_expert_intermediate_size": 32,
                  "+model.config.num_experts": 4, "+model.config.num_experts_per_tok": 2},
    "deepseek_v3": {"+model.config.q_lora_rank": 32, "+model.config.kv_lora_rank": 16,
                    "+model.config.qk_rope_head_dim": 8, "+model.config.qk_nope_head_dim": 8,
                    "+model.config.v_head_dim": 16, "+model.config.n_routed_experts": 4,
                    "+model.config.num_experts_per_tok": 2, "+model.config.moe_intermediate_size": 32,
                    "+model.config.first_k_dense_replace": 1, "+model.config.n_group": 1,
                    "+model.config.topk_group": 1},
    "starcoder2": {},
    "granite": {"+model.config.embedding_multiplier": 12.0, "+model.config.logits_scaling": 8.0},
}


def held_out(arch: str) -> dict:
    return {**HELD_OUT_BASE, "model.config.model_type": arch, **HELD_OUT[arch]}
