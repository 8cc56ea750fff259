"""The built-in models: the TRAINED default model, and a seeded RANDOM one for tests.

``load_default()`` returns the trained default model shipped in ``k2jax/default_weights``
(an HF K2 Thinking checkpoint written by ``python -m k2jax.train --recipe default --ship``:
K2's structure at toy size, INT4 experts trained with QAT, a sentencepiece tokenizer, trained
to think briefly and call the built-in tools of ``k2jax.chat.tools``; see its MODEL_CARD.md).
``python -m k2jax.sample`` runs it when no checkpoint is given.

``default_model()`` is the RANDOM, UNTRAINED model (``--random-model`` in the CLI), which
tests and benchmarks use: MLA attention with the latent cache, YaRN rope, one dense layer
then MoE layers with a sigmoid router, a shared expert and INT4 (group-32, packed) routed
experts, exactly as in K2 Thinking, only tiny. Its weights are ``k2jax.model.init_params`` of a
fixed seed, so it produces the same gibberish everywhere. It has no tokenizer: its vocabulary
is the 256 byte values followed by a few special ids, so text can be byte-encoded into it (and
its output bytes shown), clearly not K2's tokenizer.
"""

from __future__ import annotations

import os

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


TRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_weights")
TRAINED_DESCRIPTION = (
    "k2jax trained default model: Kimi K2's architecture at toy size (INT4 experts trained "
    "with QAT), trained only to think briefly and call a calculator, a unit converter and a "
    "capital lookup (see k2jax/default_weights/MODEL_CARD.md); it knows nothing else."
)


def trained_available() -> bool:
    """Whether the trained default model's weights are installed with the package."""
    return os.path.isfile(os.path.join(TRAINED_DIR, "model.safetensors.index.json"))


def load_default(dtype="auto") -> Model:
    """The trained default model as a ``Model`` with ``model.tokenizer`` (sentencepiece).

    ``dtype`` as for ``k2jax.load`` ("auto": float32 on the CPU, bfloat16 on accelerators).
    """
    if not trained_available():
        raise FileNotFoundError(
            f"the trained default model is not installed ({TRAINED_DIR} has no weights); "
            "train it with python -m k2jax.train --recipe default --ship"
        )
    import k2jax  # the loader sits beside this module, not below it
    from k2jax.chat.tokenizer import load_tokenizer

    model = k2jax.load(TRAINED_DIR, dtype=dtype)
    model.tokenizer = load_tokenizer(TRAINED_DIR)
    return model


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
