"""The built-in default model: a seeded RANDOM, UNTRAINED model with Kimi K2's structure.

It exists so ``python -m k2jax.sample`` runs with nothing downloaded: MLA attention with the
latent cache, YaRN rope, one dense layer then MoE layers with a sigmoid router, a shared expert
and INT4 (group-32, packed) routed experts, exactly as in K2 Thinking, only tiny. Its weights
are ``k2jax.model.init_params`` of a fixed seed, so it produces the same gibberish everywhere.
It has no tokenizer: its vocabulary is the 256 byte values followed by a few special ids, so
text can be byte-encoded into it (and its output bytes shown), clearly not K2's tokenizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from k2jax import model as k2model
from k2jax.model.config import Config, int4_quantization_config
from k2jax.model.quant import expert_layout_for
from k2jax.serving.loaded_model import Model

DESCRIPTION = (
    "k2jax built-in default model: RANDOM, UNTRAINED weights (seed {seed}) in Kimi K2's "
    "architecture at toy size (hidden 128, 4 layers: 1 dense + 3 MoE with 16 INT4 experts, "
    "top-4, MLA, YaRN); byte-level vocabulary, no tokenizer. Its output is meaningless; pass "
    "--checkpoint DIR to run a real model."
)

DEFAULT_SEED = 0
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BYTE_VOCAB = 256
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258  # EOS plays the role of K2's <|im_end|>

HF_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "vocab_size": 264,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.827,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 64,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 256,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
    },
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "quantization_config": int4_quantization_config(32),
}


def default_config() -> Config:
    return Config.from_hf(HF_CONFIG)


def default_model(seed: int = DEFAULT_SEED, dtype=jnp.float32) -> Model:
    """The random default model. float32 by default: on a CPU, bf16 matmuls are far slower."""
    cfg = default_config()
    init = jax.jit(lambda k: k2model.init_params(cfg, k, dtype)).lower(jax.random.key(seed))
    # Initialization runs once: XLA's optimizing passes cost ~30 s here and save nothing.
    params = init.compile(FAST_COMPILE)(jax.random.key(seed))
    # The experts in the layout the target runs (int4 under K2JAX_TARGET=tpu, else words).
    params = k2model.to_expert_layout(params, expert_layout_for())
    return Model(cfg, params, dtype)


def encode_bytes(text: str) -> list[int]:
    """UTF-8 bytes as token ids: the default model's stand-in for a tokenizer."""
    return list(text.encode("utf-8"))


def decode_bytes(ids: list[int]) -> str:
    """Byte ids back to text (special ids dropped, invalid UTF-8 replaced)."""
    return bytes(i for i in ids if i < BYTE_VOCAB).decode("utf-8", errors="replace")
