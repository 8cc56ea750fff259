"""The TPU path, executed: k2jax's TPU choices run here under ``target("tpu")``.

Under the TPU target k2jax picks exactly what it picks on a TPU (int4 expert layout, the Pallas
expert kernel, the jnp attention form, stacked layers) and runs the Pallas kernel in TPU
interpret mode with out-of-bounds reads raising and races detected
(``k2jax.kernels.platform.interpret_params``). Checked against transformers' DeepseekV3:
prefill logits on the parity configs and greedy generation through the engine, on one device and
expert-parallel on 8 fake devices, with routing that leaves most expert shards idle and with
prefill that gives experts several row tiles.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import reference
import torch

import k2jax
from k2jax.kernels.platform import target, target_platform
from k2jax.model.expert_matmul import choose_impl, routed_experts
from k2jax.model.quant import QuantizedWeight, to_int4_layout
from sharding.mesh import make_mesh

NEW = 16
BOUND = 1e-3


@pytest.fixture(autouse=True)
def tpu_target():
    with target("tpu"):
        yield


def test_the_target_chooses_the_tpu_path():
    assert target_platform() == "tpu"
    words = QuantizedWeight(jnp.zeros((2, 8, 4), jnp.int32), jnp.zeros((2, 8, 1), jnp.bfloat16))
    assert choose_impl(to_int4_layout(words)) == "pallas"


def test_the_environment_variable_chooses_the_same(monkeypatch):
    from k2jax.kernels import platform

    with target("cpu"):
        assert target_platform() == "cpu"
    monkeypatch.setattr(platform, "_target_stack", [])
    monkeypatch.setenv("K2JAX_TARGET", "tpu")
    assert target_platform() == "tpu"
    monkeypatch.setenv("K2JAX_TARGET", "gpu")
    with pytest.raises(ValueError, match="K2JAX_TARGET='gpu'"):
        target_platform()


def _experts(rng, e, out, inp):
    q = rng.integers(-8, 8, (e, out, inp)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (e, out, inp // 32)).astype(np.float32)
    from k2jax.kernels.int4_format import pack_int4_numpy

    w = QuantizedWeight(jnp.asarray(pack_int4_numpy(q)), jnp.asarray(scale, jnp.bfloat16), 32)
    return to_int4_layout(w), w.dequantize()


def test_an_idle_expert_shard_computes_zeros_and_reads_inside_its_stack():
    """A shard none of whose experts was chosen (most shards at decode): zeros out, and the
    kernel's pipeline never fetches an expert block outside the shard's stack."""
    rng = np.random.default_rng(0)
    gate, _ = _experts(rng, 4, 64, 64)
    up, _ = _experts(rng, 4, 64, 64)
    down, _ = _experts(rng, 4, 64, 64)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    ids = jnp.asarray([[9, 10], [11, 12], [13, 9]], jnp.int32)  # all on another shard
    wts = jnp.ones((3, 2), jnp.float32)
    y = routed_experts(x, ids, wts, gate, up, down, expert_offset=0, impl="pallas")
    np.testing.assert_array_equal(np.asarray(y), 0.0)


def _load(ref, tmp_path, mesh=None):
    path = reference.write_checkpoint(ref, tmp_path)
    return k2jax.load(path, dtype="float32", mesh=mesh)


@pytest.mark.parametrize("name", sorted(reference.PARITY_CONFIGS))
def test_prefill_logits_match_reference_on_the_tpu_path(name, tmp_path):
    ref = reference.build(seed=len(name), **reference.PARITY_CONFIGS[name])
    model = _load(ref, tmp_path)
    experts = model.params["moe_layers"]["moe"]["experts"]
    assert "gate_values" in experts and experts["gate_values"].dtype == jnp.int4
    tokens = np.random.RandomState(1).randint(0, ref.raw["vocab_size"], (2, 24))
    ours, theirs = model.logits(tokens), ref.logits(tokens).numpy()
    assert np.abs(ours - theirs).max() <= BOUND
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


# Prompts of different lengths; the longest is several prefill chunks.
PROMPTS = reference.MIXED_PROMPTS


@pytest.fixture(scope="module")
def ref():
    return reference.build(seed=3)


@pytest.fixture(scope="module")
def hf_batch8(ref):
    return reference.greedy_batch(ref, PROMPTS, NEW)[0]


def _greedy(model, prompts, chunk=8):
    return model.generate(
        prompts, NEW, temperature=0.0, stop_token_ids=[], prefill_chunk=chunk, max_batch=8
    )


def test_engine_greedy_matches_reference_batch_1_one_device(ref, tmp_path):
    model = _load(ref, tmp_path)
    want = reference.greedy_batch(ref, [PROMPTS[2]], NEW)[0]
    assert _greedy(model, [PROMPTS[2]]) == want


def test_engine_greedy_matches_reference_batch_8_one_device(ref, hf_batch8, tmp_path):
    assert _greedy(_load(ref, tmp_path), PROMPTS) == hf_batch8


def test_engine_greedy_matches_reference_expert_parallel_data_parallel(ref, hf_batch8, tmp_path):
    """16 experts over 4 devices, 4 each, with data=2: at decode most shards receive no
    token; no device holds a whole expert stack. (Experts 8 ways, 2 each, with every dense
    weight split too: tests/test_roofline_layout.py.)"""
    sizes = {"data": 2, "expert": 4}
    mesh = make_mesh(**sizes)
    model = _load(ref, tmp_path, mesh=mesh)
    values = model.params["moe_layers"]["moe"]["experts"]["gate_values"]
    assert {s.data.shape[1] for s in values.addressable_shards} == {16 // sizes["expert"]}
    assert _greedy(model, PROMPTS) == hf_batch8
    assert _greedy(model, [PROMPTS[0]]) == reference.greedy_batch(ref, [PROMPTS[0]], NEW)[0]


def test_prefill_with_several_row_tiles_per_expert_and_idle_shards(tmp_path):
    """Every token picks experts 0-3 (a selection bias of +10, more than any sigmoid score
    can outweigh): 160 tokens give each of them 160 rows, two 128-row prefill tiles, all on
    shards 0 and 1 of 8, while the other six shards receive nothing."""
    ref = reference.build(seed=5)
    k = ref.raw["num_experts_per_tok"]
    with torch.no_grad():
        for i, layer in enumerate(ref.torch_model.model.layers):
            if not hasattr(layer.mlp, "experts"):
                continue
            bias = layer.mlp.gate.e_score_correction_bias
            bias[:k] += 10.0
            ref.tensors[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = bias.clone()
    model = _load(ref, tmp_path, mesh=make_mesh(expert=8))
    tokens = np.random.RandomState(2).randint(0, ref.raw["vocab_size"], (1, 160))
    ours, theirs = model.logits(tokens), ref.logits(tokens).numpy()
    assert np.abs(ours - theirs).max() <= BOUND
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_sample_cli_with_the_tpu_target_gives_the_cpu_tokens():
    """``K2JAX_TARGET=tpu`` runs the default model through the TPU path (int4 layout, Pallas
    kernel in the TPU interpreter, stacked layers): the same greedy tokens as the CPU path."""
    import json
    import os
    import subprocess
    import sys

    def run(**env):
        # float32 on both: "auto" would pick bfloat16 for the TPU target, and this compares
        # the paths, not the dtypes.
        args = ["--max-new-tokens", "8", "--temperature", "0", "--json", "--no-compile-cache"]
        args += ["--dtype", "float32"]
        base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "K2JAX_TARGET")}
        out = subprocess.run(
            [sys.executable, "-m", "k2jax.sample", *args],
            env={**base, "JAX_PLATFORMS": "cpu", **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)["new_ids"]

    tpu, cpu = run(K2JAX_TARGET="tpu"), run()
    assert len(tpu) == 8 and tpu == cpu


def test_converted_checkpoint_loads_onto_8_devices_with_every_expert_stack_split(tmp_path):
    """A converted checkpoint restored on the TPU target over expert=4, tensor=2: every array is
    restored into its sharding and the experts repacked to int4 shard by shard, so no device
    holds a whole expert stack (the decode rules split the 16 experts over both axes: 2 a
    device); the logits equal transformers'."""
    from convert.converter import convert

    ref = reference.build(seed=4)
    hf = reference.write_checkpoint(ref, tmp_path / "hf")
    out = tmp_path / "k2"
    convert(hf, out, dtype="float32", quiet=True)
    model = k2jax.load(out, dtype="float32", mesh=make_mesh(expert=4, tensor=2))
    experts = model.params["moe_layers"]["moe"]["experts"]
    assert sorted(experts) == sorted(
        f"{p}_{n}" for p in ("gate", "up", "down") for n in ("values", "group_scale")
    )
    for name, leaf in experts.items():
        assert leaf.shape[1] == 16, name
        assert {s.data.shape[1] for s in leaf.addressable_shards} == {2}, name
        assert len(leaf.addressable_shards) == 8
    tokens = np.random.RandomState(3).randint(0, ref.raw["vocab_size"], (2, 16))
    assert np.abs(model.logits(tokens) - ref.logits(tokens).numpy()).max() <= BOUND
