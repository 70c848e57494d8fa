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
