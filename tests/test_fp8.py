"""FP8 checkpoints (DeepSeek-V3/R1, Kimi K2 Instruct): reading, expert formats, the FP8 kernel.

The oracle: a tiny DeepSeek-V3-structured model in transformers (float32, eager) whose linear
weights are FP8 with 128x128 block scales, written in the on-disk format (``X.weight``
float8_e4m3fn + ``X.weight_scale_inv`` float32). Hidden size 256 spans two blocks; the expert
and dense-MLP widths (192, 320) and the query rank (160) are not multiples of 128, so edge
blocks are ragged. The reference model runs the weights dequantized by transformers' own FP8
code (``_dequantize_fp8_weight``), not by anything in k2jax; the quantizer below only produces
test data. The checkpoint carries a multi-token-prediction layer, as DeepSeek-V3's does.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

# Several test processes (and colleagues) may hold libtpu at once for AOT compilation.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import reference  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight  # noqa: E402

import k2jax  # noqa: E402
from convert.converter import convert  # noqa: E402
from convert.hf_reader import CheckpointError  # noqa: E402
from k2jax.kernels import fp8_pallas  # noqa: E402
from k2jax.kernels.platform import target  # noqa: E402
from k2jax.model.config import ConfigError  # noqa: E402
from k2jax.model.expert_matmul import pallas_reads, routed_experts  # noqa: E402
from k2jax.model.quant import Fp8Weight, layout_of  # noqa: E402

BLOCK = 128
FP8_MAX = 448.0
BOUND = 1e-3
TOKENS = np.random.RandomState(1).randint(0, 256, (2, 16))
FP8_QUANT = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [BLOCK, BLOCK],
}
TINY_V3 = {
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 320,
    "moe_intermediate_size": 192,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 160,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    },
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test data: e4m3 values and float32 scales, amax / 448 per 128x128 block (ragged edges)."""
    out, inp = w.shape
    rows, cols = -(-out // BLOCK), -(-inp // BLOCK)
    padded = torch.zeros(rows * BLOCK, cols * BLOCK)
    padded[:out, :inp] = w.float()
    blocks = padded.reshape(rows, BLOCK, cols, BLOCK)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12).float()
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.reshape(rows * BLOCK, cols * BLOCK)[:out, :inp].contiguous(), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """transformers' FP8 dequantization, in float32."""
    return _dequantize_fp8_weight(q.clone(), scale, [BLOCK, BLOCK], torch.float32)


def v3_config(**overrides) -> dict:
    raw = copy.deepcopy(TINY_V3)
    raw.update(overrides)
    raw.update(
        {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "hidden_act": "silu",
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "num_nextn_predict_layers": 1,
            "torch_dtype": "bfloat16",
            "quantization_config": copy.deepcopy(FP8_QUANT),
        }
    )
    return raw


def build_fp8(seed: int = 0):
    """(transformers model running the dequantized weights, {HF name: tensor as written})."""
    raw = v3_config()
    kwargs = {k: copy.deepcopy(v) for k, v in raw.items() if k != "quantization_config"}
    for k in ("architectures", "model_type"):
        kwargs.pop(k)
    kwargs.update(num_nextn_predict_layers=0, num_mtp_layers=0)
    cfg = DeepseekV3Config(**kwargs)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    tensors: dict[str, torch.Tensor] = {}

    def fp8(name: str, w: torch.Tensor) -> torch.Tensor:
        q, s = quantize_fp8(w)
        tensors[name], tensors[name + "_scale_inv"] = q, s
        return dequantize(q, s)

    e, m, d = raw["n_routed_experts"], raw["moe_intermediate_size"], raw["hidden_size"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate_up_proj") or name.endswith("experts.down_proj"):
                continue
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_((1.0 + randn(*p.shape, std=0.1)).to(torch.bfloat16).float())
                tensors[name] = p.detach().to(torch.bfloat16).clone()
            elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                std = 1.0 if "embed" in name else p.shape[-1] ** -0.5
                p.copy_(randn(*p.shape, std=std).to(torch.bfloat16).float())
                tensors[name] = p.detach().to(torch.bfloat16).clone()
            elif name.endswith("mlp.gate.weight"):  # the router stays bf16 in FP8 checkpoints
                p.copy_(randn(*p.shape, std=3.0 / p.shape[1] ** 0.5).to(torch.bfloat16).float())
                tensors[name] = p.detach().to(torch.bfloat16).clone()
            else:  # every linear weight is FP8
                p.copy_(fp8(name, randn(*p.shape, std=p.shape[-1] ** -0.5)))
        for i, layer in enumerate(model.model.layers):
            if not hasattr(layer.mlp, "experts"):
                continue
            prefix = f"model.layers.{i}.mlp"
            bias = randn(e, std=0.05)
            layer.mlp.gate.e_score_correction_bias.copy_(bias)
            tensors[f"{prefix}.gate.e_score_correction_bias"] = bias.float().clone()
            for x in range(e):
                g = fp8(f"{prefix}.experts.{x}.gate_proj.weight", randn(m, d, std=d**-0.5))
                u = fp8(f"{prefix}.experts.{x}.up_proj.weight", randn(m, d, std=d**-0.5))
                dn = fp8(f"{prefix}.experts.{x}.down_proj.weight", randn(d, m, std=m**-0.5))
                layer.mlp.experts.gate_up_proj[x].copy_(torch.cat([g, u], 0))
                layer.mlp.experts.down_proj[x].copy_(dn)
    # DeepSeek-V3's multi-token-prediction layer (index num_hidden_layers): present, unused.
    mtp = f"model.layers.{raw['num_hidden_layers']}"
    fp8(f"{mtp}.eh_proj.weight", randn(d, 2 * d))
    fp8(f"{mtp}.self_attn.q_a_proj.weight", randn(raw["q_lora_rank"], d))
    tensors[f"{mtp}.enorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    tensors[f"{mtp}.shared_head.head.weight"] = randn(raw["vocab_size"], d).to(torch.bfloat16)
    return raw, model, tensors


def write(raw: dict, tensors: dict, out: str) -> str:
    """One shard per layer (the MTP layer its own), embeddings and head last, plus the index."""
    os.makedirs(out, exist_ok=True)
    shards: dict[str, dict] = {}
    for name, t in tensors.items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "head"
        shards.setdefault(f"model-{part}.safetensors", {})[name] = t
    weight_map = {}
    for shard, content in sorted(shards.items()):
        save_file(content, os.path.join(out, shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in content})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    return out


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    raw, model, tensors = build_fp8()
    path = write(raw, tensors, str(tmp_path_factory.mktemp("fp8") / "hf"))
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(TOKENS)).logits.float().numpy()
    return path, tensors, logits


@pytest.fixture(scope="module")
def loaded_fp8(fp8_model):
    path, _, _ = fp8_model
    return k2jax.load(path, dtype="float32")


# --- parity --------------------------------------------------------------------------------


def test_fp8_experts_match_reference(fp8_model, loaded_fp8):
    _, _, theirs = fp8_model
    experts = loaded_fp8.params["moe_layers"]["moe"]["experts"]
    assert layout_of(experts) == "fp8"  # the checkpoint's own format, kept
    assert experts["gate_fp8"].dtype == jnp.float8_e4m3fn
    assert 8.0 < loaded_fp8.expert_bits_per_weight() < 8.01
    ours = loaded_fp8.logits(TOKENS)
    diff = np.abs(ours - theirs).max()
    print(f"fp8 experts: max |logit diff| {diff:.3g} (max |logit| {np.abs(theirs).max():.2f})")
    assert diff <= BOUND
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert np.abs(theirs).max() > 1.0  # not a vacuous comparison


def test_fp8_experts_on_a_mesh(fp8_model, loaded_fp8):
    """Expert-parallel over 8 devices: each FP8 expert stack (values and block scales) split
    on its expert axis by the rules, the same logits as one device."""
    from sharding.mesh import make_mesh

    path, _, _ = fp8_model
    model = k2jax.load(path, dtype="float32", mesh=make_mesh(data=1, expert=4, tensor=2))
    scale = model.params["moe_layers"]["moe"]["experts"]["down_block_scale"]
    assert scale.sharding.shard_shape(scale.shape)[1] == 1  # 8 experts over 8 devices
    np.testing.assert_allclose(model.logits(TOKENS), loaded_fp8.logits(TOKENS), rtol=0, atol=1e-5)


def test_mtp_layer_skipped_with_a_notice(fp8_model, capfd):
    path, tensors, _ = fp8_model
    assert any(n.startswith("model.layers.3.") for n in tensors)  # the MTP layer is on disk
    from convert.hf_reader import HFCheckpoint

    HFCheckpoint(path).validate()
    err = capfd.readouterr().err.strip().splitlines()
    notices = [line for line in err if "multi-token-prediction" in line]
    assert len(notices) == 1 and "layer 3" in notices[0], err


def test_bf16_experts_match_reference(fp8_model):
    path, _, theirs = fp8_model
    model = k2jax.load(path, dtype="float32", experts="bf16")
    assert layout_of(model.params["moe_layers"]["moe"]["experts"]) == "dense"
    assert np.abs(model.logits(TOKENS) - theirs).max() <= BOUND


def test_int4_requantization_is_compressed_tensors_packing(fp8_model):
    """``experts="int4"``: each FP8 expert dequantized, then packed exactly as compressed-tensors
    packs K2 Thinking (symmetric, group 32, bf16 scales)."""
    path, tensors, _ = fp8_model
    model = k2jax.load(path, dtype="float32", experts="int4")
    experts = model.params["moe_layers"]["moe"]["experts"]
    assert layout_of(experts) == "words"
    for layer, expert, proj in ((0, 0, "gate"), (1, 5, "down")):
        name = f"model.layers.{layer + 1}.mlp.experts.{expert}.{proj}_proj.weight"
        want = reference.pack_int4(dequantize(tensors[name], tensors[name + "_scale_inv"]))
        packed = np.asarray(experts[f"{proj}_packed"][layer, expert])
        scale = np.asarray(experts[f"{proj}_scale"][layer, expert]).astype(np.float32)
        np.testing.assert_array_equal(packed, want["weight_packed"].numpy())
        np.testing.assert_array_equal(scale, want["weight_scale"].float().numpy())


def test_converter_output_equals_hf_load_bit_for_bit(fp8_model, loaded_fp8, tmp_path):
    path, _, _ = fp8_model
    out = tmp_path / "k2jax"
    convert(path, out, dtype="float32", quiet=True, verify=True)
    with open(out / "k2jax_checkpoint.json") as f:
        manifest = json.load(f)
    assert manifest["experts"] == "fp8"
    assert manifest["arrays"]["moe_layers.moe.experts.up_fp8"]["dtype"] == "float8_e4m3fn"
    converted = k2jax.load(out, dtype="float32")
    np.testing.assert_array_equal(converted.logits(TOKENS), loaded_fp8.logits(TOKENS))
    with pytest.raises(ValueError, match="holds fp8 experts.*--experts int4"):
        k2jax.load(out, dtype="float32", experts="int4")


def test_converter_int4_experts_equal_hf_load(fp8_model, tmp_path):
    path, _, _ = fp8_model
    experts = "int4"
    out = tmp_path / f"k2jax-{experts}"
    convert(path, out, quiet=True, experts=experts)
    a = k2jax.load(out, dtype="bfloat16").params
    b = k2jax.load(path, dtype="bfloat16", experts=experts).params
    for (where, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        assert x.dtype == y.dtype and x.shape == y.shape, where
        np.testing.assert_array_equal(
            np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8), err_msg=str(where)
        )


# --- bad input -----------------------------------------------------------------------------

EXPERT = "model.layers.2.mlp.experts.3.up_proj.weight"


@pytest.fixture
def ckpt(fp8_model, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(fp8_model[0], path)
    return path


def _edit_shard(path, name, edit):
    with open(path / "model.safetensors.index.json") as f:
        index = json.load(f)
    shard = index["weight_map"][name]
    tensors = load_file(str(path / shard))
    edit(tensors, index)
    save_file(tensors, str(path / shard), metadata={"format": "pt"})
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    return shard


def _edit_config(path, **quant):
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"].update(quant)
    (path / "config.json").write_text(json.dumps(raw))


def test_missing_scale_names_the_tensor(ckpt):
    scale = EXPERT + "_scale_inv"

    def drop(t, index):
        del t[scale], index["weight_map"][scale]

    _edit_shard(ckpt, scale, drop)
    with pytest.raises(CheckpointError, match=f"'{scale}' is missing: '{EXPERT}'.* is FP8"):
        k2jax.load(ckpt)


def test_wrong_scale_shape_names_the_tensor(ckpt):
    scale = EXPERT + "_scale_inv"
    shard = _edit_shard(ckpt, scale, lambda t, _: t.update({scale: t[scale][:1].clone()}))
    with pytest.raises(
        CheckpointError, match=rf"'{scale}' in {shard} has shape \[1, 2\], expected \[2, 2\]"
    ):
        k2jax.load(ckpt)


@pytest.mark.parametrize(
    "field, value",
    [("weight_block_size", [64, 64]), ("weight_block_size", [128, 64]), ("fmt", "e5m2")],
)
def test_unsupported_quantization_field_is_named(ckpt, field, value):
    _edit_config(ckpt, **{field: value})
    with pytest.raises(ConfigError, match=rf"'quantization_config\.{field}' = .* not supported"):
        k2jax.load(ckpt)


def test_bad_experts_choice(fp8_model):
    with pytest.raises(ValueError, match="experts='int8' is not one of"):
        k2jax.load(fp8_model[0], experts="int8")


# --- the FP8 expert matmul -----------------------------------------------------------------


def _fp8_experts(e: int, out: int, inp: int, seed: int):
    """(Fp8Weight, its float32 dequantization by transformers) for e random experts."""
    gen = torch.Generator().manual_seed(seed)
    qs, ss, ws = [], [], []
    for _ in range(e):
        q, s = quantize_fp8(torch.randn(out, inp, generator=gen) * inp**-0.5)
        qs.append(q.view(torch.uint8).numpy())
        ss.append(s.numpy().reshape(1, -1))  # Fp8Weight holds the block grid flattened
        ws.append(dequantize(q, s).numpy())
    values = jnp.asarray(np.stack(qs)).view(jnp.float8_e4m3fn)
    return Fp8Weight(values, jnp.asarray(np.stack(ss))), np.stack(ws)


def _reference_moe(x, ids, wts, g, u, d):
    """SwiGLU over dequantized experts in float32 numpy."""
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k]
            h = x[t] @ g[e].T
            h = h / (1 + np.exp(-h)) * (x[t] @ u[e].T)
            y[t] += wts[t, k] * (h @ d[e].T)
    return y


@pytest.fixture(scope="module")
def moe_case():
    e, d, m, t, k = 4, 256, 192, 4, 2
    gate, g = _fp8_experts(e, m, d, 1)
    up, u = _fp8_experts(e, m, d, 2)
    down, dn = _fp8_experts(e, d, m, 3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(t, d)).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    wts = rng.uniform(0.2, 1.0, (t, k)).astype(np.float32)
    want = _reference_moe(x, ids, wts, g, u, dn)
    return (x, ids, wts, gate, up, down), want


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_fp8_expert_matmul_equals_dequantize_then_matmul(moe_case, platform):
    """On the CPU (each chosen expert widened) and on the TPU target (the Pallas kernel in the
    TPU interpreter: out-of-bounds reads raise)."""
    (x, ids, wts, gate, up, down), want = moe_case
    with target(platform), jax.default_matmul_precision("highest"):
        got = routed_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(wts), gate, up, down)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fp8_kernel_reads_one_byte_per_weight_of_the_chosen_experts():
    """Counted from the kernel's own index maps: at decode each chosen local expert's FP8 tiles
    are copied exactly once per projection (1 byte per weight), its block scales a few KB."""
    d, m, e, k, shards = 7168, 2048, 256, 8, 2
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(8)]).astype(np.int32)
    local = e // shards
    for s in range(shards):
        lo = s * local
        chosen = len({x for x in ids.ravel() if lo <= x < lo + local})
        got = pallas_reads(ids, expert_offset=lo, num_local=local, hidden=d, inter=m, layout="fp8")
        assert got["values"] == chosen * 3 * d * m
        assert 0 < got["scales"] < 0.002 * got["values"]
        assert got["activations"] < 0.1 * got["values"]


def test_fp8_kernel_compiles_for_tpu():
    """The real XLA:TPU compiler (libtpu, ahead of time) takes the kernel at DeepSeek's shapes,
    bf16 decode tiles and a layer stack read in place."""
    from jax.experimental import topologies

    dev = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    d, m, rows, tm = 7168, 2048, 64, 8
    args = (
        jax.ShapeDtypeStruct((rows, d), jnp.bfloat16, sharding=sh),
        jax.ShapeDtypeStruct((rows // tm,), jnp.int32, sharding=sh),
        jax.ShapeDtypeStruct((1,), jnp.int32, sharding=sh),
        jax.ShapeDtypeStruct((2, 64, m, d), jnp.float8_e4m3fn, sharding=sh),
        jax.ShapeDtypeStruct((2, 64, 1, m // BLOCK * d // BLOCK), jnp.float32, sharding=sh),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=sh),
    )

    def call(x, te, nt, w, s, layer):
        return fp8_pallas.grouped_fp8_matmul(x, te, nt, w, s, tm=tm, interpret=False, layer=layer)

    hlo = jax.jit(call).lower(*args).compile().as_text()
    assert 'custom_call_target="tpu_custom_call"' in hlo
