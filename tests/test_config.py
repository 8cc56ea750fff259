"""Config.from_hf: the real K2 Thinking config, K2 Instruct and DeepSeek-V3 variants, refusals."""

import json

import pytest
import reference

from k2jax.model.config import Config, ConfigError


def _k2():
    with open(reference.K2_CONFIG_PATH) as f:
        return json.load(f)


def test_real_k2_thinking_config():
    cfg = Config.from_hf(reference.K2_CONFIG_PATH)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_dense_layers, cfg.num_moe_layers) == (
        7168,
        61,
        1,
        60,
    )
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (
        384,
        8,
        1,
        1,
    )
    assert cfg.quantization.kind == "int4" and cfg.quantization.group_size == 32
    assert cfg.cache_width == 576
    assert cfg.eos_token_id == 163586
    assert Config.from_hf(cfg.to_hf()) == cfg


def test_k2_instruct_fp8_config():
    raw = _k2()
    raw["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    raw["rope_scaling"] = dict(raw["rope_scaling"], factor=32.0)
    raw["rms_norm_eps"] = 1e-6
    cfg = Config.from_hf(raw)
    assert cfg.quantization.kind == "fp8" and cfg.quantization.block_size == 128
    assert cfg.rope_scaling.factor == 32.0


def test_deepseek_v3_style_config():
    raw = _k2()
    raw.update(
        n_group=8,
        topk_group=4,
        n_routed_experts=256,
        first_k_dense_replace=3,
        num_nextn_predict_layers=1,
        rope_scaling=None,
        routed_scaling_factor=2.5,
    )
    cfg = Config.from_hf(raw)
    assert (cfg.n_group, cfg.topk_group, cfg.num_dense_layers) == (8, 4, 3)
    assert cfg.rope_scaling.factor == 1.0 and cfg.rope_attention_factor == 1.0
    assert cfg.num_nextn_predict_layers == 1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("scoring_func", "softmax", "'scoring_func' = 'softmax'"),
        ("hidden_act", "gelu", "'hidden_act' = 'gelu'"),
        ("tie_word_embeddings", True, "'tie_word_embeddings' = True"),
        ("q_lora_rank", None, "'q_lora_rank' = None"),
        ("n_group", 5, "'n_group' = 5"),
        ("topk_group", 2, "'topk_group' = 2"),
        ("num_key_value_heads", 8, "'num_key_value_heads' = 8"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, "'rope_scaling.type' = 'linear'"),
        ("hidden_size", -1, "'hidden_size' = -1"),
        ("topk_method", "greedy", "'topk_method' = 'greedy'"),
    ],
)
def test_unsupported_values_are_refused_by_name(field, value, message):
    raw = _k2()
    raw[field] = value
    with pytest.raises(ConfigError) as e:
        Config.from_hf(raw)
    assert message in str(e.value)


def test_unsupported_quantization_is_refused_by_name():
    raw = _k2()
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    with pytest.raises(ConfigError, match=r"group_0\.weights\.num_bits' = 8"):
        Config.from_hf(raw)
    raw = _k2()
    raw["quantization_config"]["format"] = "float-quantized"
    with pytest.raises(ConfigError, match="'quantization_config.format' = 'float-quantized'"):
        Config.from_hf(raw)


def test_missing_field_is_named():
    raw = _k2()
    del raw["kv_lora_rank"]
    with pytest.raises(ConfigError, match="'kv_lora_rank' is missing"):
        Config.from_hf(raw)
