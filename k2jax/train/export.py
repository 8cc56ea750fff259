"""Export trained params as an HF K2 Thinking checkpoint, laid out like Moonshot's.

``config.json`` with the compressed-tensors ``pack-quantized`` block; safetensors shards (the
dense layers, one per MoE layer, then embeddings, norm and lm_head) and
``model.safetensors.index.json``. Routed experts are INT4: each projection of each expert as
``weight_packed`` int32 [O, I/8], ``weight_scale`` bf16 [O, I/32] and ``weight_shape`` int64,
rounded to nearest from the float master weights (``k2jax.model.quant.quantize_int4``, which
is also what the QAT forward saw); everything else is bf16, the router's correction bias
float32. The names and layouts are those of ``convert.hf_names`` (which reads them back), each
transform here its inverse.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from k2jax import model as k2model
from k2jax.model.config import Config

BF16 = ml_dtypes.bfloat16


def _halves_permutation(width: int) -> np.ndarray:
    return np.concatenate([np.arange(0, width, 2), np.arange(1, width, 2)])


def _bf16(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32).astype(BF16))


def _layer_tensors(cfg: Config, stack: dict, index: int, is_moe: bool) -> dict[str, np.ndarray]:
    """HF tensors of one layer (its params sliced from ``stack`` at ``index``)."""
    p = jax.tree.map(lambda a: np.asarray(a[index]), stack)
    n, h, r, u = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    c, d = cfg.kv_lora_rank, cfg.hidden_size
    attn = p["attn"]
    out = {
        "input_layernorm.weight": _bf16(p["attn_norm"]["scale"]),
        "post_attention_layernorm.weight": _bf16(p["mlp_norm"]["scale"]),
        "self_attn.q_a_proj.weight": _bf16(attn["w_q_down"].T),
        "self_attn.q_a_layernorm.weight": _bf16(attn["q_norm"]["scale"]),
        "self_attn.kv_a_layernorm.weight": _bf16(attn["kv_norm"]["scale"]),
    }
    # q_b_proj rows per head are [nope H | rope R interleaved]; ours hold the rope in halves.
    order = np.concatenate([np.arange(h), h + _halves_permutation(r)])
    per_head = np.empty((n, h + r, cfg.q_lora_rank), np.float32)
    per_head[:, order, :] = attn["w_q_up"].transpose(1, 2, 0)
    out["self_attn.q_b_proj.weight"] = _bf16(per_head.reshape(n * (h + r), -1))
    order = np.concatenate([np.arange(c), c + _halves_permutation(r)])
    kv_down = np.empty((c + r, d), np.float32)
    kv_down[order] = attn["w_kv_down"].T
    out["self_attn.kv_a_proj_with_mqa.weight"] = _bf16(kv_down)
    kv_up = np.concatenate([attn["w_k_up"], attn["w_v_up"]], axis=1)  # [N, H + U, C]
    out["self_attn.kv_b_proj.weight"] = _bf16(kv_up.reshape(n * (h + u), c))
    out["self_attn.o_proj.weight"] = _bf16(attn["w_o"].transpose(2, 0, 1).reshape(d, n * u))
    if not is_moe:
        for proj in ("gate", "up", "down"):
            out[f"mlp.{proj}_proj.weight"] = _bf16(p["mlp"][f"w_{proj}"].T)
        return out
    moe = p["moe"]
    out["mlp.gate.weight"] = _bf16(moe["w_router"].T)
    out["mlp.gate.e_score_correction_bias"] = np.asarray(moe["e_score_correction_bias"], np.float32)
    if cfg.n_shared_experts:
        for proj in ("gate", "up", "down"):
            out[f"mlp.shared_experts.{proj}_proj.weight"] = _bf16(moe["shared"][f"w_{proj}"].T)
    experts = moe["experts"]
    for e in range(cfg.n_routed_experts):
        for proj in ("gate", "up", "down"):
            base = f"mlp.experts.{e}.{proj}_proj"
            packed = np.asarray(experts[f"{proj}_packed"][e])
            out[f"{base}.weight_packed"] = np.ascontiguousarray(packed.astype(np.int32))
            out[f"{base}.weight_scale"] = np.ascontiguousarray(
                np.asarray(experts[f"{proj}_scale"][e]).astype(BF16)
            )
            out[f"{base}.weight_shape"] = np.asarray(
                [packed.shape[0], packed.shape[1] * 8], np.int64
            )
    return out


def export_hf(
    params: dict,
    cfg: Config,
    out_dir: str | os.PathLike,
    *,
    tokenizer_file: str | os.PathLike | None = None,
    extra_config: dict | None = None,
) -> str:
    """Writes ``params`` (float master weights, ``"float"`` experts, or already packed
    ``"words"``) as an HF K2 Thinking checkpoint in ``out_dir``; returns the directory.

    ``cfg`` must describe INT4 experts; the tokenizer file, if given, is copied as
    ``tokenizer.model``; ``extra_config`` entries are added to ``config.json``.
    """
    if cfg.quantization.kind != "int4":
        raise ValueError(
            f"export writes INT4 experts like K2 Thinking; the config's experts are "
            f"{cfg.quantization.kind!r} (pass a config with the int4 quantization block)"
        )
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    to_words = functools.partial(
        k2model.to_expert_layout, layout="words", group_size=cfg.quantization.group_size
    )
    params = jax.device_get(jax.jit(to_words)(params))
    shards: list[dict[str, np.ndarray]] = []
    dense = params.get("dense_layers")
    if dense is not None:
        shard = {}
        for i in range(cfg.num_dense_layers):
            for name, t in _layer_tensors(cfg, dense, i, False).items():
                shard[f"model.layers.{i}.{name}"] = t
        shards.append(shard)
    for i in range(cfg.num_moe_layers):
        layer = cfg.num_dense_layers + i
        tensors = _layer_tensors(cfg, params["moe_layers"], i, True)
        shards.append({f"model.layers.{layer}.{name}": t for name, t in tensors.items()})
    shards.append(
        {
            "model.embed_tokens.weight": _bf16(params["embed"]),
            "model.norm.weight": _bf16(params["final_norm"]["scale"]),
            "lm_head.weight": _bf16(np.asarray(params["lm_head"]).T),
        }
    )
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        for tensor_name, t in shard.items():
            weight_map[tensor_name] = name
            total += t.nbytes
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config = {**cfg.to_hf(), "torch_dtype": "bfloat16", **(extra_config or {})}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, os.path.join(out_dir, "tokenizer.model"))
    return out_dir
