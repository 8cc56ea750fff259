"""Export: the HF K2 checkpoint k2jax.train writes is Moonshot's layout, and transformers +
compressed-tensors built from it give k2jax's logits (the parity bound)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import reference
import torch
from safetensors import safe_open

import k2jax
from convert.hf_names import all_specs
from k2jax.model.config import Config
from k2jax.train import step as train_step
from k2jax.train.export import export_hf

BOUND = 1e-3  # tests/test_parity.py's bound on float32 logits
SHIPPED = os.path.join(os.path.dirname(k2jax.__file__), "default_weights")
RAW = reference.hf_config_dict(
    n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, num_hidden_layers=3
)


def _tensors(path: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    return out


def transformers_from_export(path: str) -> tuple[dict, torch.nn.Module]:
    """transformers' DeepseekV3 holding an exported checkpoint (experts unpacked by
    compressed-tensors; from_pretrained leaves K2's per-expert INT4 tensors unloaded)."""
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    model = DeepseekV3(raw)
    tensors = _tensors(path)
    state = model.state_dict()
    with torch.no_grad():
        for layer in range(raw["num_hidden_layers"]):
            prefix = f"model.layers.{layer}.mlp.experts"
            if f"{prefix}.gate_up_proj" not in state:
                continue
            for e in range(raw["n_routed_experts"]):
                w = {
                    proj: reference.unpack_int4(
                        {
                            key: tensors.pop(f"{prefix}.{e}.{proj}.{key}")
                            for key in ("weight_packed", "weight_scale", "weight_shape")
                        }
                    )
                    for proj in ("gate_proj", "up_proj", "down_proj")
                }
                state[f"{prefix}.gate_up_proj"][e].copy_(torch.cat([w["gate_proj"], w["up_proj"]]))
                state[f"{prefix}.down_proj"][e].copy_(w["down_proj"])
        for name, t in tensors.items():
            state[name].copy_(t.float())
    missing = [n for n in state if n not in tensors and ".mlp.experts." not in n]
    assert not missing, missing
    return raw, model


def DeepseekV3(raw: dict) -> torch.nn.Module:
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(reference._torch_config(raw)).float().eval()


@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
    cfg = Config.from_hf(RAW)
    params = train_step.init_train_params(cfg, jax.random.key(3))
    keys = iter(jax.random.split(jax.random.key(4), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            0.05 * jax.random.normal(next(keys), a.shape)
            if train_step._is_bias(path)
            else a + 0.02 * jax.random.normal(next(keys), a.shape) * np.std(a)
        ),
        params,
    )
    return export_hf(params, cfg, tmp_path_factory.mktemp("export"))


def test_export_is_k2_thinkings_layout(random_export):
    with open(os.path.join(random_export, "config.json")) as f:
        raw = json.load(f)
    assert raw["quantization_config"] == reference._int4_quantization_config()
    cfg = Config.from_hf(raw)
    tensors = _tensors(random_export)
    specs = all_specs(cfg)
    assert set(tensors) == set(specs)
    for name, spec in specs.items():
        t = tensors[name]
        dtype = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32"}.get(
            t.dtype, "I64"
        )
        assert tuple(t.shape) == spec.shape and dtype in spec.dtypes, name
        if name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32
        elif not name.endswith(("weight_packed", "weight_shape")):
            assert t.dtype == torch.bfloat16, name


@pytest.mark.parametrize("which", ["random", "shipped default"])
def test_exported_checkpoint_in_transformers_gives_k2jax_logits(which, random_export):
    path = random_export if which == "random" else SHIPPED
    raw, torch_model = transformers_from_export(path)
    tokens = np.random.RandomState(5).randint(0, raw["vocab_size"], (2, 24))
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.as_tensor(tokens)).logits.float().numpy()
    ours = k2jax.load(path, dtype="float32").logits(tokens)
    diff = np.abs(ours - theirs).max()
    assert diff <= BOUND, diff
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
