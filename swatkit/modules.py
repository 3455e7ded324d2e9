"""The tunable modules of a block, by short name -> their path in an HF Llama-family checkpoint
(model.layers.L.<path>.weight). Mods_Rob, LoRA targets and the scan all speak these names. Also the
network's shape as config.json gives it (ModelConfig)."""

from dataclasses import dataclass

MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass
class ModelConfig:
    """The shape of the network; checkpoint.read_config maps config.json's HF keys onto it."""

    vocab_size: int
    dim: int  # hidden_size
    hidden_dim: int  # intermediate_size of the SwiGLU MLP
    n_layers: int
    n_heads: int
    n_kv_heads: int  # fewer than n_heads: grouped-query attention (GQA)
    head_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3's long-context scaling parameters, or None
    qkv_bias: bool = False  # qwen2 has biases on q, k and v
    o_bias: bool = False
    tie: bool = False  # the output head is the embedding matrix
    window: int | None = None  # sliding window (mistral, qwen2): longer sequences are refused
    eos: tuple = ()  # the token ids generation stops at
    raw: dict | None = None  # config.json as read: save() writes it back
