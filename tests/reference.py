"""The oracle: tiny random K2-structured models in transformers, written in K2's on-disk format.

A model is built with transformers' ``DeepseekV3ForCausalLM`` (float32, eager), initialized so
that routing varies (unit fan-in weights, norms near 1, a strong router, a nonzero correction
bias), then made K2-like:

- every routed expert projection is quantized and packed by compressed-tensors
  (``calculate_qparams`` for the symmetric group-32 scales, ``PackedQuantizationCompressor``
  for ``weight_packed`` / ``weight_scale`` / ``weight_shape``), and the reference model's own
  expert weights are replaced by the float32 dequantization of exactly those packed values;
- every other weight is rounded to bf16 (as the checkpoint stores it), the router bias stays
  float32.

``write_checkpoint`` lays the result out like K2 Thinking's directory: ``config.json`` with the
compressed-tensors block, one shard for the dense layers, one per MoE layer, one for embeddings
and head, and ``model.safetensors.index.json``.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

GROUP_SIZE = 32
K2_CONFIG_PATH = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "k2", "kimi-k2-thinking.config.json"
)

TINY: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
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
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
    },
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 250,
    "eos_token_id": 251,
    "pad_token_id": 255,
}


def hf_config_dict(**overrides: Any) -> dict[str, Any]:
    """A K2 Thinking style config.json dict (INT4 experts) with tiny dimensions."""
    raw = copy.deepcopy(TINY)
    raw.update(copy.deepcopy(overrides))
    raw.update(
        {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "kimi_k2",
            "hidden_act": "silu",
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "num_nextn_predict_layers": 0,
            "torch_dtype": "bfloat16",
            "quantization_config": _int4_quantization_config(),
        }
    )
    return raw


def _int4_quantization_config() -> dict[str, Any]:
    """The compressed-tensors block of K2 Thinking's own config.json (../shared/k2/)."""
    with open(K2_CONFIG_PATH) as f:
        block = json.load(f)["quantization_config"]
    assert block["config_groups"]["group_0"]["weights"]["group_size"] == GROUP_SIZE
    return block


def _torch_config(raw: dict[str, Any]) -> DeepseekV3Config:
    kwargs = {k: copy.deepcopy(v) for k, v in raw.items() if k != "quantization_config"}
    kwargs.pop("architectures", None)
    kwargs.pop("model_type", None)
    kwargs["num_nextn_predict_layers"] = 0
    kwargs["num_mtp_layers"] = 0
    cfg = DeepseekV3Config(**kwargs)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


_SCHEME = QuantizationScheme(
    targets=["Linear"],
    weights=QuantizationArgs(
        num_bits=4, type="int", strategy="group", group_size=GROUP_SIZE, symmetric=True
    ),
)


def pack_int4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors' packing of one [O, I] weight: weight_packed, weight_scale, weight_shape.

    Scales come from compressed-tensors' own ``calculate_qparams`` over each group's min/max
    (symmetric: amax / 7.5), rounded to bf16 as the checkpoint stores them.
    """
    out_dim, in_dim = weight.shape
    groups = weight.float().reshape(out_dim, in_dim // GROUP_SIZE, GROUP_SIZE)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), _SCHEME.weights)
    scale = scale.to(torch.bfloat16)
    compressed = PackedQuantizationCompressor.compress(
        {"weight": weight.float(), "weight_scale": scale.float()}, _SCHEME
    )
    return {
        "weight_packed": compressed["weight_packed"].contiguous(),
        "weight_scale": scale.contiguous(),
        "weight_shape": compressed["weight_shape"].to(torch.int64),
    }


def unpack_int4(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """compressed-tensors' decompression, done in float32 (exact products)."""
    out = PackedQuantizationCompressor.decompress(
        {
            "weight_packed": packed["weight_packed"],
            "weight_scale": packed["weight_scale"].float(),
            "weight_shape": packed["weight_shape"],
        },
        _SCHEME,
    )
    return out["weight"].float()


class ReferenceModel:
    """A transformers model plus the K2-format tensors that reproduce it exactly."""

    def __init__(self, raw: dict[str, Any], torch_model: DeepseekV3ForCausalLM, tensors: dict):
        self.raw = raw
        self.torch_model = torch_model
        self.tensors = tensors  # HF name -> torch tensor, as written to disk

    def logits(self, token_ids) -> torch.Tensor:
        with torch.no_grad():
            ids = torch.as_tensor(token_ids, dtype=torch.long)
            return self.torch_model(input_ids=ids).logits.float()

    def greedy(self, prompt: list[int], new: int, stop_ids: list[int] | None = None) -> list[int]:
        """transformers' greedy ``generate`` for one prompt: the new ids, ending at a stop id."""
        with torch.no_grad():
            out = self.torch_model.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=self.raw["pad_token_id"],
            )
        return out[0, len(prompt) :].tolist()


def build(seed: int = 0, router_scale: float = 3.0, bias_scale: float = 0.05, **overrides):
    """A random tiny K2 model: returns a ReferenceModel (transformers, float32)."""
    raw = hf_config_dict(**overrides)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DeepseekV3ForCausalLM(_torch_config(raw)).float().eval()

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate_up_proj") or name.endswith("experts.down_proj"):
                continue
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1.0 + randn(*p.shape, std=0.1))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(randn(*p.shape))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(randn(*p.shape, std=router_scale / p.shape[1] ** 0.5))
            else:
                p.copy_(randn(*p.shape, std=1.0 / p.shape[-1] ** 0.5))
            p.copy_(p.to(torch.bfloat16).float())
            tensors[name] = p.detach().to(torch.bfloat16).clone()
        for i, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{i}.mlp"
            if not hasattr(layer.mlp, "experts"):
                continue
            bias = randn(raw["n_routed_experts"], std=bias_scale)
            layer.mlp.gate.e_score_correction_bias.copy_(bias)
            tensors[f"{prefix}.gate.e_score_correction_bias"] = bias.float().clone()
            experts = layer.mlp.experts
            m, d = raw["moe_intermediate_size"], raw["hidden_size"]
            for e in range(raw["n_routed_experts"]):
                w = {
                    "gate_proj": randn(m, d, std=d**-0.5),
                    "up_proj": randn(m, d, std=d**-0.5),
                    "down_proj": randn(d, m, std=m**-0.5),
                }
                deq = {}
                for proj, weight in w.items():
                    packed = pack_int4(weight)
                    for key, t in packed.items():
                        tensors[f"{prefix}.experts.{e}.{proj}.{key}"] = t
                    deq[proj] = unpack_int4(packed)
                experts.gate_up_proj[e].copy_(torch.cat([deq["gate_proj"], deq["up_proj"]], 0))
                experts.down_proj[e].copy_(deq["down_proj"])
    return ReferenceModel(raw, model, tensors)


def write_checkpoint(ref: ReferenceModel, out_dir: str | os.PathLike) -> str:
    """Write ``ref`` in K2 Thinking's on-disk layout; returns the directory."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    n_layers = ref.raw["num_hidden_layers"]
    n_dense = ref.raw["first_k_dense_replace"]

    def shard_of(name: str) -> str:
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            index = 0 if layer < n_dense else 1 + layer - n_dense
        else:
            index = n_layers - n_dense + 1
        return f"model-{index + 1:05d}-of-{n_layers - n_dense + 2:05d}.safetensors"

    for name, t in ref.tensors.items():
        shards.setdefault(shard_of(name), {})[name] = t
    weight_map = {}
    for shard, content in sorted(shards.items()):
        save_file(content, os.path.join(out_dir, shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in content})
    total = sum(t.numel() * t.element_size() for t in ref.tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(ref.raw, f, indent=1)
    return out_dir


# The parity configs every numeric test runs: each changes one thing the model must get right.
PARITY_CONFIGS: dict[str, dict[str, Any]] = {
    # K2 Thinking's own shape: YaRN factor 64 with the beta_fast = beta_slow = 1 step.
    "k2": {},
    # DeepSeek-V3 style group-limited routing, and two dense layers before the MoE stack.
    "grouped": {
        "n_group": 4,
        "topk_group": 2,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 2,
    },
    # Value heads wider than the nope key heads, and plain RoPE (no scaling).
    "wide_values": {"v_head_dim": 24, "rope_scaling": None, "rope_theta": 10000.0},
    # A wide YaRN ramp (beta_fast 32 over 16 rope dims): dims 2..6 interpolate partially.
    "yarn_ramp": {
        "qk_rope_head_dim": 16,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
    },
}


# Eight prompts of different lengths for batch-8 generation tests; the longest is several
# prefill chunks. Shared by the TPU-target and layout tests, so both compare the same batch.
MIXED_PROMPTS = [
    [11, 200, 7],
    [3, 90, 45, 45, 120, 8, 77, 1, 64],
    [5, 17, 33, 2, 99, 100, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
    [40, 41],
    [250, 3, 3, 3, 9],
    [77] * 12,
    [1, 2, 3, 4, 5, 6, 7],
    [120, 121, 122, 123],
]


def greedy_batch(ref: ReferenceModel, prompts: list[list[int]], new: int):
    """transformers' greedy generate over a left-padded batch (no early stop): the new ids of
    every prompt and the raw log-softmax of every step's logits [B, new, V]."""
    width = max(len(p) for p in prompts)
    pad = ref.raw["pad_token_id"]
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    tm = ref.torch_model
    tm.generation_config.eos_token_id = None
    with torch.no_grad():
        out = tm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=0,
            do_sample=False,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
    logits = torch.stack(out.logits, 1).float()  # [B, new, V] raw logits
    return out.sequences[:, width:].tolist(), torch.log_softmax(logits, -1).numpy()
