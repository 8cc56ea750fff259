"""The default recipe: the shipped model's architecture, data sizes and optimization knobs.

Kimi K2's structure at toy size: MLA with YaRN, one dense layer then MoE layers,
group-limited sigmoid routing (4 groups of 2 experts, the best 2 groups kept, top-2 experts)
with a shared expert and a selection-only correction bias, INT4 routed experts (trained with
QAT). Sizes were chosen by measuring step time on this 2-core CPU (docs/training.md).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from k2jax.model.config import int4_quantization_config
from k2jax.train.step import TrainConfig

VOCAB_SIZE = 1024  # sentencepiece pieces, specials included

MODEL: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 192,
    "intermediate_size": 384,
    "moe_intermediate_size": 96,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.827,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 512,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
    },
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "torch_dtype": "bfloat16",
    "quantization_config": int4_quantization_config(32),
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything one training run needs besides the output directory."""

    name: str
    model: dict[str, Any]
    train: TrainConfig
    num_conversations: int
    data_seed: int
    # The run ends with a phase of ``final_phase_steps`` steps, with the routed experts
    # fake-quantized (``final_phase_qat``) or not. The first phase trains float experts on its
    # own warm-up + cosine schedule (ending at its last step); the final phase continues on the
    # tail of the same schedule stretched to the run's end. Measured: QAT from step 1 trails the
    # float model by +56% held-out loss, QAT as a final phase beats it (docs/training.md).
    final_phase_steps: int = 0
    final_phase_qat: bool = True

    @property
    def qat(self) -> bool:
        """Whether the trained experts are fake-quantized in the last phase (the export's)."""
        return self.final_phase_qat and self.final_phase_steps > 0

    @property
    def phases(self) -> tuple[tuple[TrainConfig, bool], ...]:
        """``(train config, qat)`` per phase; each trains to its config's ``steps``."""
        if self.final_phase_steps <= 0:
            return ((self.train, False),)
        first = dataclasses.replace(self.train, steps=self.float_steps)
        return ((first, False), (self.train, self.final_phase_qat))

    @property
    def float_steps(self) -> int:
        """The step the final phase starts after (the first phase's end)."""
        return self.train.steps - max(self.final_phase_steps, 0)


_DEFAULT_TRAIN = TrainConfig(
    steps=4900, batch_size=8, seq_len=416, peak_lr=3e-3, warmup_steps=100, remat=False
)

RECIPES = {
    "default": Recipe(
        "default",
        MODEL,
        _DEFAULT_TRAIN,
        num_conversations=36_000,
        data_seed=1,
        final_phase_steps=400,
    ),
    # The same model, data and schedule with float experts to the end (the evaluation's
    # baseline). Its first phase is the default run's, bit for bit, so it can branch from a
    # default run's kept phase-boundary checkpoint (``python -m k2jax.train --branch-from``).
    "no_qat": Recipe(
        "no_qat",
        MODEL,
        _DEFAULT_TRAIN,
        num_conversations=36_000,
        data_seed=1,
        final_phase_steps=400,
        final_phase_qat=False,
    ),
    # Seconds, not hours: checks the whole pipeline end to end.
    "smoke": Recipe(
        "smoke",
        {**MODEL, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32},
        TrainConfig(steps=6, batch_size=4, seq_len=448, warmup_steps=2, checkpoint_every=2),
        num_conversations=300,
        data_seed=1,
        final_phase_steps=2,
    ),
}

EVAL_SEED = 1_000_003  # never used for training data


def model_config(recipe: Recipe, vocab_size: int) -> dict[str, Any]:
    """The HF config dict of ``recipe``'s model for a tokenizer of ``vocab_size`` pieces."""
    raw = copy.deepcopy(recipe.model)
    raw["vocab_size"] = vocab_size
    return raw
