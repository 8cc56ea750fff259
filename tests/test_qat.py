"""INT4 quantization-aware training: the rounding is compressed-tensors', the fake-quantized
forward equals inference on the exported packed weights, and the gradient is straight-through."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import reference
import torch

import k2jax
from k2jax.model.config import Config, ExpertQuantization
from k2jax.model.quant import fake_quantize_int4, quantize_int4
from k2jax.model.transformer import pack_int4
from k2jax.train import step as train_step
from k2jax.train.export import export_hf

RAW = reference.hf_config_dict(
    n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, num_hidden_layers=3
)
CFG = Config.from_hf(RAW)


def test_rounding_and_packing_equal_compressed_tensors():
    w = np.random.RandomState(0).standard_normal((48, 96)).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero group
    theirs = reference.pack_int4(torch.from_numpy(w))
    q, scale = quantize_int4(jnp.asarray(w))
    np.testing.assert_array_equal(
        np.asarray(scale).astype(np.float32), theirs["weight_scale"].float().numpy()
    )
    np.testing.assert_array_equal(np.asarray(pack_int4(q)), theirs["weight_packed"].numpy())
    assert (np.asarray(q) == -8).any() and (np.asarray(q) == 7).any()  # the whole range


def _trained_like_params(seed=0):
    """Float master weights off any INT4 grid, dense weights bf16-representable (what export
    writes), and a nonzero router bias."""
    params = train_step.init_train_params(CFG, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))

    def perturb(path, a):
        if train_step._is_experts(path):
            return a + 0.02 * jax.random.normal(next(keys), a.shape) * jnp.std(a)
        if train_step._is_bias(path):
            return 0.05 * jax.random.normal(next(keys), a.shape)
        return a.astype(jnp.bfloat16).astype(jnp.float32)

    return jax.tree_util.tree_map_with_path(perturb, params)


def test_fake_quantized_forward_equals_inference_on_the_exported_packed_weights(tmp_path):
    params = _trained_like_params()
    model = k2jax.load(export_hf(params, CFG, tmp_path / "export"), dtype="float32")
    tokens = np.random.RandomState(1).randint(0, CFG.vocab_size, (2, 20))
    inference = model.logits(tokens)
    qat, _ = train_step.forward(params, jnp.asarray(tokens), cfg=CFG, dtype=jnp.float32)
    diff = np.abs(inference - np.asarray(qat)).max()
    assert diff <= 1e-4, diff  # float32 rounding (logits ~5)
    assert (inference.argmax(-1) == np.asarray(qat).argmax(-1)).all()
    # Not vacuous: the same float weights without fake quantization give other logits.
    plain_cfg = dataclasses.replace(CFG, quantization=ExpertQuantization("none"))
    plain, _ = train_step.forward(params, jnp.asarray(tokens), cfg=plain_cfg, dtype=jnp.float32)
    assert np.abs(inference - np.asarray(plain)).max() > 100 * diff


def test_straight_through_gradient_is_the_identity_within_the_clipping_range():
    w = jax.random.normal(jax.random.key(0), (8, 64))
    _, rtn_scale = quantize_int4(w)
    scale = (rtn_scale.astype(jnp.float32) * 0.6).astype(jnp.bfloat16)  # some weights clip
    upstream = jax.random.normal(jax.random.key(1), w.shape)
    grad = jax.grad(lambda v: jnp.sum(upstream * fake_quantize_int4(v, 32, scale)))(w)
    ratio = np.asarray(w).reshape(8, 2, 32) / np.asarray(scale, np.float32)[..., None]
    inside = ((ratio >= -8.5) & (ratio <= 7.5)).reshape(w.shape)
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(np.asarray(grad)[inside], np.asarray(upstream)[inside])
    np.testing.assert_array_equal(np.asarray(grad)[~inside], 0.0)
    # The forward is the rounded grid, not the float weights.
    values = fake_quantize_int4(w, 32, scale)
    q = np.asarray(values).reshape(8, 2, 32) / np.asarray(scale, np.float32)[..., None]
    np.testing.assert_array_equal(q, np.clip(np.round(ratio), -8, 7))
