"""What re-quantizing an FP8 checkpoint's experts to INT4 costs in accuracy (docs/fp8.md).

A mid-size DeepSeek-V3-structured model with FP8 weights (every linear weight float8_e4m3fn
with 128x128 float32 block scales, router / norms / embeddings bf16, as DeepSeek-V3 ships) is
written to disk, then loaded by k2jax with its routed experts kept in FP8 and re-quantized to
K2 Thinking's INT4 (symmetric, group 32, bf16 scales, round to nearest). Each is compared on a
fixed set of prompts with the model's own FP8 logits: the reference is the same checkpoint
loaded with ``experts="bf16"`` in float32, i.e. every FP8 weight dequantized exactly (value
times block scale in float32) and run in float32. Reported per variant: top-1 agreement of the
next-token argmax and the mean KL(reference || variant) over all positions.

The weights are random (unit fan-in Gaussians, so no trained outliers): the figures compare
formats on equal terms, they do not predict a trained model's benchmark scores.

    JAX_PLATFORMS=cpu nice -n 10 python benchmarks/fp8_to_int4.py [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

BLOCK = 128
FP8_MAX = 448.0
SEED = 0
PROMPTS, LENGTH = 8, 64  # the fixed inputs: seeded uniform token ids
MID: dict = {
    "vocab_size": 4096,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "moe_intermediate_size": 384,
    "num_hidden_layers": 5,
    "first_k_dense_replace": 1,
    "n_routed_experts": 32,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 384,
    "kv_lora_rank": 256,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    },
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_act": "silu",
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [BLOCK, BLOCK],
    },
}


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales (amax / 448 per 128x128 block, ragged edges)."""
    out, inp = w.shape
    rows, cols = -(-out // BLOCK), -(-inp // BLOCK)
    padded = torch.zeros(rows * BLOCK, cols * BLOCK)
    padded[:out, :inp] = w
    blocks = padded.reshape(rows, BLOCK, cols, BLOCK)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12).float()
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.reshape(rows * BLOCK, cols * BLOCK)[:out, :inp].contiguous(), scale


def write_checkpoint(cfg: dict, out: str) -> None:
    """The random FP8 model in DeepSeek-V3's on-disk layout: one shard per layer + head."""
    gen = torch.Generator().manual_seed(SEED)
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    q, c, r = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    n, h, u = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    e, m, f = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    def bf16(*shape, std=1.0, mean=0.0):
        return (mean + randn(*shape, std=std)).to(torch.bfloat16)

    weight_map = {}

    def save(shard: str, tensors: dict) -> None:
        save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})

    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        t: dict[str, torch.Tensor] = {}

        def linear(name: str, o: int, i: int, t=t) -> None:
            t[name], t[name + "_scale_inv"] = quantize_fp8(randn(o, i, std=i**-0.5))

        t[f"{p}.input_layernorm.weight"] = bf16(d, std=0.1, mean=1.0)
        t[f"{p}.post_attention_layernorm.weight"] = bf16(d, std=0.1, mean=1.0)
        t[f"{p}.self_attn.q_a_layernorm.weight"] = bf16(q, std=0.1, mean=1.0)
        t[f"{p}.self_attn.kv_a_layernorm.weight"] = bf16(c, std=0.1, mean=1.0)
        linear(f"{p}.self_attn.q_a_proj.weight", q, d)
        linear(f"{p}.self_attn.q_b_proj.weight", n * (h + r), q)
        linear(f"{p}.self_attn.kv_a_proj_with_mqa.weight", c + r, d)
        linear(f"{p}.self_attn.kv_b_proj.weight", n * (h + u), c)
        linear(f"{p}.self_attn.o_proj.weight", d, n * u)
        if layer < cfg["first_k_dense_replace"]:
            for proj, (o, i) in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
                linear(f"{p}.mlp.{proj}_proj.weight", o, i)
        else:
            t[f"{p}.mlp.gate.weight"] = bf16(e, d, std=3.0 / d**0.5)
            t[f"{p}.mlp.gate.e_score_correction_bias"] = randn(e, std=0.05)
            for proj, (o, i) in (("gate", (m, d)), ("up", (m, d)), ("down", (d, m))):
                linear(f"{p}.mlp.shared_experts.{proj}_proj.weight", o, i)
                for x in range(e):
                    linear(f"{p}.mlp.experts.{x}.{proj}_proj.weight", o, i)
        save(f"model-layer-{layer:03d}.safetensors", t)
    save(
        "model-head.safetensors",
        {
            "model.embed_tokens.weight": bf16(v, d),
            "model.norm.weight": bf16(d, std=0.1, mean=1.0),
            "lm_head.weight": bf16(v, d, std=d**-0.5),
        },
    )
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
    }


VARIANTS = (
    # (label, experts, dtype)
    ("fp8 experts, float32", "fp8", "float32"),
    ("int4 experts (RTN), float32", "int4", "float32"),
    ("fp8 experts, bf16", "fp8", "bfloat16"),
    ("int4 experts (RTN), bf16", "int4", "bfloat16"),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None, help="write the checkpoint here (default: temp)")
    args = parser.parse_args(argv)
    import k2jax

    tokens = np.random.default_rng(SEED).integers(2, MID["vocab_size"], (PROMPTS, LENGTH))
    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or os.path.join(tmp, "fp8")
        os.makedirs(path, exist_ok=True)
        t0 = time.perf_counter()
        write_checkpoint(MID, path)
        print(f"wrote the FP8 checkpoint in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        reference = k2jax.load(path, dtype="float32", experts="bf16").logits(tokens)
        lp = log_softmax(reference)
        entropy = float(-(np.exp(lp) * lp).sum(-1).mean())
        rows = []
        for label, experts, dtype in VARIANTS:
            model = k2jax.load(path, dtype=dtype, experts=experts)
            row = {"variant": label, "experts": experts, "dtype": dtype}
            row["expert_bits_per_weight"] = model.expert_bits_per_weight()
            row.update(compare(reference, model.logits(tokens)))
            rows.append(row)
            print(f"{label}: {row}", file=sys.stderr)
            del model
    shape = {k: MID[k] for k in ("hidden_size", "moe_intermediate_size", "n_routed_experts")}
    result = {
        "model": shape,
        "prompts": PROMPTS,
        "length": LENGTH,
        "reference_entropy": entropy,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"mid-size DeepSeek-V3-structured FP8 model ({MID['num_hidden_layers']} layers, hidden "
        f"{MID['hidden_size']}, {MID['n_routed_experts']} experts of {MID['moe_intermediate_size']}"
        f", top-{MID['num_experts_per_tok']}), {PROMPTS} x {LENGTH} fixed tokens, against its own "
        f"FP8 logits (float32, exact dequantization; their mean entropy {entropy:.2f} nats)\n"
    )
    print("| experts | bits/weight | top-1 agreement | mean KL (nats) | max KL |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['expert_bits_per_weight']:.2f} | "
            f"{r['top1_agreement']:.4f} | {r['mean_kl']:.2e} | {r['max_kl']:.2e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
