"""The model's architecture, read from an HF ``config.json`` and frozen.

``Config.from_hf`` accepts Kimi K2 Thinking (INT4 ``pack-quantized`` experts), K2 Instruct (FP8
block-quantized) and DeepSeek-V3 style configs, and refuses anything the model does not
implement with a ``ConfigError`` that names the field and its value. Serving knobs (page size,
batch, sampling) live elsewhere; the mesh is never part of a config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any


class ConfigError(ValueError):
    """An HF config field holds a value this implementation does not support."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters; ``factor == 1`` means plain RoPE."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0 = absent (transformers then uses mscale(factor, 1) for cos/sin)
    mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True)
class ExpertQuantization:
    """How the routed experts are stored on disk.

    ``kind`` is ``"int4"`` (compressed-tensors pack-quantized: symmetric groups of
    ``group_size`` input columns), ``"fp8"`` (e4m3 with float32 ``block_size`` square blocks) or
    ``"none"`` (plain bf16 tensors).
    """

    kind: str = "none"
    group_size: int = 32
    block_size: int = 128


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of a DeepSeek-V3-family model (dimension letters as in ``k2jax``)."""

    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F, dense layers
    moe_intermediate_size: int  # M, each routed and shared expert
    num_layers: int  # L
    first_k_dense_replace: int
    n_routed_experts: int  # E
    num_experts_per_tok: int  # K
    n_shared_experts: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    num_heads: int  # N
    q_lora_rank: int  # Q
    kv_lora_rank: int  # C
    qk_nope_head_dim: int  # H
    qk_rope_head_dim: int  # R
    v_head_dim: int  # U
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    rms_norm_eps: float
    # transformers (the reference) and DeepSeek's code build q_a_layernorm / kv_a_layernorm with
    # their default eps 1e-6, not rms_norm_eps; we follow the reference (see docs/numerics.md).
    low_rank_norm_eps: float = 1e-6
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    quantization: ExpertQuantization = ExpertQuantization()
    # Multi-token-prediction layers stored after the main layers; inference does not use them.
    num_nextn_predict_layers: int = 0

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per token and layer by absorbed MLA: latent C plus rope key R."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs.factor > 1 and rs.mscale_all_dim:
            m = _yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """The YaRN multiplier on cos/sin: mscale(factor, mscale) / mscale(factor, all_dim)."""
        rs = self.rope_scaling
        if rs.factor <= 1:
            return 1.0
        if rs.mscale and rs.mscale_all_dim:
            return _yarn_mscale(rs.factor, rs.mscale) / _yarn_mscale(rs.factor, rs.mscale_all_dim)
        return _yarn_mscale(rs.factor, 1.0)

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> Config:
        """Build a Config from an HF config: a dict, a ``config.json`` path, or its directory."""
        if isinstance(source, dict):
            raw = source
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                try:
                    raw = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(
                        f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
                    ) from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return _from_dict(raw)

    def to_hf(self) -> dict[str, Any]:
        """The fields as an HF-style dict (enough for ``from_hf`` to rebuild this Config)."""
        rs = self.rope_scaling
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "kimi_k2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_layers,
            "first_k_dense_replace": self.first_k_dense_replace,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_shared_experts": self.n_shared_experts,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "num_nextn_predict_layers": 0,
        }
        if rs.factor > 1:
            out["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(rs)}
        q = self.quantization
        if q.kind == "int4":
            out["quantization_config"] = int4_quantization_config(q.group_size)
        elif q.kind == "fp8":
            out["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [q.block_size, q.block_size],
            }
        return out


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def int4_quantization_config(group_size: int = 32) -> dict[str, Any]:
    """The compressed-tensors block K2 Thinking's config.json carries (INT4 routed experts)."""
    return {
        "config_groups": {
            "group_0": {
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "actorder": None,
                    "block_structure": None,
                    "dynamic": False,
                    "group_size": group_size,
                    "num_bits": 4,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "strategy": "group",
                    "symmetric": True,
                    "type": "int",
                },
            }
        },
        "format": "pack-quantized",
        "ignore": [
            "lm_head",
            "re:.*self_attn.*",
            "re:.*shared_experts.*",
            "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
        ],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def _require(raw: dict[str, Any], field: str) -> Any:
    if field not in raw or raw[field] is None:
        raise ConfigError(f"config field {field!r} is missing")
    return raw[field]


def _refuse_unless(raw: dict[str, Any], field: str, allowed: tuple, default: Any = None) -> None:
    value = raw.get(field, default)
    if value not in allowed:
        raise ConfigError(
            f"config field {field!r} = {value!r} is not supported (supported: {list(allowed)})"
        )


def _positive_int(raw: dict[str, Any], field: str) -> int:
    value = _require(raw, field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config field {field!r} = {value!r} must be a positive integer")
    return value


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling:
    rs = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not rs:
        return RopeScaling()
    kind = rs.get("type", rs.get("rope_type"))
    if kind == "default":
        return RopeScaling()
    if kind != "yarn":
        raise ConfigError(
            f"config field 'rope_scaling.type' = {kind!r} is not supported (supported: 'yarn')"
        )
    factor = float(_require(rs, "factor"))
    if factor < 1:
        raise ConfigError(f"config field 'rope_scaling.factor' = {factor!r} must be >= 1")
    return RopeScaling(
        factor=factor,
        original_max_position_embeddings=int(
            rs.get("original_max_position_embeddings", raw.get("max_position_embeddings", 4096))
        ),
        beta_fast=float(rs.get("beta_fast") or 32.0),
        beta_slow=float(rs.get("beta_slow") or 1.0),
        mscale=float(rs.get("mscale") or 0.0),
        mscale_all_dim=float(rs.get("mscale_all_dim") or 0.0),
    )


def _quantization(raw: dict[str, Any]) -> ExpertQuantization:
    qc = raw.get("quantization_config")
    if not qc:
        return ExpertQuantization("none")
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size", [128, 128])
        if len(block) != 2 or block[0] != block[1]:
            raise ConfigError(
                f"config field 'quantization_config.weight_block_size' = {block!r} is not "
                "supported (square blocks only)"
            )
        return ExpertQuantization("fp8", block_size=int(block[0]))
    if method != "compressed-tensors":
        raise ConfigError(
            f"config field 'quantization_config.quant_method' = {method!r} is not supported "
            "(supported: 'compressed-tensors', 'fp8')"
        )
    if qc.get("format") != "pack-quantized":
        raise ConfigError(
            f"config field 'quantization_config.format' = {qc.get('format')!r} is not "
            "supported (supported: 'pack-quantized')"
        )
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ConfigError(
            f"config field 'quantization_config.config_groups' has {len(groups)} groups; "
            "exactly one is supported"
        )
    ((name, group),) = groups.items()
    w = group.get("weights") or {}
    where = f"quantization_config.config_groups.{name}.weights"
    checks = {"num_bits": 4, "type": "int", "strategy": "group", "symmetric": True}
    for key, want in checks.items():
        if w.get(key) != want:
            raise ConfigError(
                f"config field '{where}.{key}' = {w.get(key)!r} is not supported "
                f"(supported: {want!r})"
            )
    if w.get("actorder"):
        raise ConfigError(f"config field '{where}.actorder' = {w['actorder']!r} is not supported")
    if group.get("input_activations"):
        raise ConfigError(
            f"config field 'quantization_config.config_groups.{name}.input_activations' is "
            "not supported (weight-only quantization)"
        )
    group_size = w.get("group_size")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 8:
        raise ConfigError(
            f"config field '{where}.group_size' = {group_size!r} must be a positive multiple of 8"
        )
    return ExpertQuantization("int4", group_size=group_size)


def _from_dict(raw: dict[str, Any]) -> Config:
    _refuse_unless(raw, "hidden_act", ("silu",), "silu")
    _refuse_unless(raw, "scoring_func", ("sigmoid",), "sigmoid")
    _refuse_unless(raw, "topk_method", ("noaux_tc",), "noaux_tc")
    _refuse_unless(raw, "tie_word_embeddings", (False,), False)
    _refuse_unless(raw, "attention_bias", (False,), False)
    _refuse_unless(raw, "moe_layer_freq", (1,), 1)
    heads = _positive_int(raw, "num_attention_heads")
    kv_heads = raw.get("num_key_value_heads", heads)
    if kv_heads != heads:
        raise ConfigError(
            f"config field 'num_key_value_heads' = {kv_heads!r} must equal "
            f"num_attention_heads ({heads}) for MLA"
        )
    if raw.get("q_lora_rank") is None:
        raise ConfigError(
            "config field 'q_lora_rank' = None is not supported (the low-rank query path is "
            "required)"
        )
    experts = _positive_int(raw, "n_routed_experts")
    top_k = _positive_int(raw, "num_experts_per_tok")
    n_group = int(raw.get("n_group") or 1)
    topk_group = int(raw.get("topk_group") or 1)
    if n_group <= 0 or experts % n_group:
        raise ConfigError(
            f"config field 'n_group' = {n_group!r} must divide n_routed_experts ({experts})"
        )
    if not 1 <= topk_group <= n_group:
        raise ConfigError(
            f"config field 'topk_group' = {topk_group!r} must be between 1 and n_group ({n_group})"
        )
    if top_k > topk_group * (experts // n_group):
        raise ConfigError(
            f"config field 'num_experts_per_tok' = {top_k!r} exceeds the experts in "
            f"topk_group ({topk_group}) groups of {experts // n_group}"
        )
    if n_group > 1 and experts // n_group < 2:
        raise ConfigError(
            f"config field 'n_group' = {n_group!r} leaves fewer than 2 experts per group"
        )
    rope_dim = _positive_int(raw, "qk_rope_head_dim")
    if rope_dim % 2:
        raise ConfigError(f"config field 'qk_rope_head_dim' = {rope_dim!r} must be even")
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    quant = _quantization(raw)
    return Config(
        vocab_size=_positive_int(raw, "vocab_size"),
        hidden_size=_positive_int(raw, "hidden_size"),
        intermediate_size=_positive_int(raw, "intermediate_size"),
        moe_intermediate_size=_positive_int(raw, "moe_intermediate_size"),
        num_layers=_positive_int(raw, "num_hidden_layers"),
        first_k_dense_replace=int(raw.get("first_k_dense_replace", 0)),
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_shared_experts=int(raw.get("n_shared_experts") or 0),
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        num_heads=heads,
        q_lora_rank=_positive_int(raw, "q_lora_rank"),
        kv_lora_rank=_positive_int(raw, "kv_lora_rank"),
        qk_nope_head_dim=_positive_int(raw, "qk_nope_head_dim"),
        qk_rope_head_dim=rope_dim,
        v_head_dim=_positive_int(raw, "v_head_dim"),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(raw),
        max_position_embeddings=_positive_int(raw, "max_position_embeddings"),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id"),
        quantization=quant,
        num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers") or 0),
    )
