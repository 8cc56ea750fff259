"""Per-component parity against the reference's own modules (transformers DeepseekV3, float32).

RoPE frequencies and cos/sin multiplier, the softmax scale, the router's choices and weights,
one MLA layer and one MoE layer, each fed identical inputs on both sides.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import torch

import k2jax
from k2jax.model import rope
from k2jax.model.attention import MLAttention
from k2jax.model.moe import MoE, route


@pytest.fixture(scope="module", params=sorted(reference.PARITY_CONFIGS))
def pair(request, tmp_path_factory):
    name = request.param
    ref = reference.build(seed=len(name), **reference.PARITY_CONFIGS[name])
    path = reference.write_checkpoint(ref, tmp_path_factory.mktemp(name))
    return ref, k2jax.load(path, dtype="float32")


def _layer(params, stack, i=0):
    return jax.tree.map(lambda a: a[i], params[stack])


def test_rope_frequencies_and_multiplier(pair):
    ref, model = pair
    rotary = ref.torch_model.model.rotary_emb
    np.testing.assert_allclose(
        rope.inv_frequencies(model.config), rotary.inv_freq.numpy(), rtol=1e-6, atol=0
    )
    assert model.config.rope_attention_factor == pytest.approx(rotary.attention_scaling, rel=1e-7)


def test_k2_yarn_numbers_from_the_reference_doc():
    """K2_REFERENCE.md: dims 0..19 keep f_i, 20..31 are divided by 64; scale 0.1446796."""
    import json

    with open(reference.K2_CONFIG_PATH) as f:
        cfg = k2jax.Config.from_hf(json.load(f))
    base = 50000.0 ** (-np.arange(0, 64, 2) / 64)
    ratio = rope.inv_frequencies(cfg) / base
    np.testing.assert_allclose(ratio[:20], 1.0, rtol=1e-6)
    np.testing.assert_allclose(ratio[20:], 1 / 64, rtol=1e-6)
    assert cfg.softmax_scale == pytest.approx(0.1446796, abs=1e-7)


def test_softmax_scale(pair):
    ref, model = pair
    attn = ref.torch_model.model.layers[0].self_attn
    assert model.config.softmax_scale == pytest.approx(attn.scaling, rel=1e-7)


def _moe_layer_index(ref):
    return ref.raw["first_k_dense_replace"]


def test_router_choice_and_weights(pair):
    ref, model = pair
    layer = ref.torch_model.model.layers[_moe_layer_index(ref)]
    x = torch.randn(64, ref.raw["hidden_size"], generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        _, want_w, want_ids = layer.mlp.gate(x)
    p = _layer(model.params, "moe_layers")["moe"]
    ids, w = route(
        model.config, jnp.asarray(x.numpy()), p["w_router"], p["e_score_correction_bias"]
    )
    order_ref = want_ids.argsort(-1)
    order_ours = np.argsort(np.asarray(ids), -1)
    np.testing.assert_array_equal(
        np.take_along_axis(np.asarray(ids), order_ours, -1),
        torch.gather(want_ids, 1, order_ref).numpy(),
    )
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(w), order_ours, -1),
        torch.gather(want_w, 1, order_ref).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


def _hidden(ref, t=12, b=2, seed=3):
    return torch.randn(b, t, ref.raw["hidden_size"], generator=torch.Generator().manual_seed(seed))


def test_one_mla_layer(pair):
    ref, model = pair
    cfg = model.config
    i = _moe_layer_index(ref)
    attn = ref.torch_model.model.layers[i].self_attn
    x = _hidden(ref)
    b, t, _ = x.shape
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = ref.torch_model.model.rotary_emb(x, pos)
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None].expand(b, 1, t, t)
    with torch.no_grad():
        want, _ = attn(x, position_embeddings=(cos, sin), attention_mask=mask)
    positions = jnp.asarray(pos.numpy(), jnp.int32)
    our_cos, our_sin = rope.rope_tables(cfg, positions)
    params = _layer(model.params, "moe_layers")["attn"]
    got, _ = MLAttention(cfg, jnp.float32).apply(
        {"params": params}, jnp.asarray(x.numpy()), our_cos, our_sin, positions
    )
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-5, rtol=1e-4)


def test_one_moe_layer(pair):
    ref, model = pair
    i = _moe_layer_index(ref)
    mlp = ref.torch_model.model.layers[i].mlp
    x = _hidden(ref, seed=4)
    with torch.no_grad():
        want = mlp(x)
    params = _layer(model.params, "moe_layers")["moe"]
    got = MoE(model.config, jnp.float32).apply({"params": params}, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-5, rtol=1e-4)


def test_scanned_equals_unrolled(pair):
    ref, model = pair
    from k2jax import model as k2model

    tokens = jnp.asarray(np.random.RandomState(5).randint(0, ref.raw["vocab_size"], (2, 10)))
    positions = jnp.broadcast_to(jnp.arange(10), tokens.shape)
    kw = dict(cfg=model.config, dtype=jnp.float32)
    scanned, _ = jax.jit(lambda p, t: k2model.forward(p, t, positions, **kw))(model.params, tokens)
    unrolled, _ = jax.jit(lambda p, t: k2model.forward(p, t, positions, scan_layers=False, **kw))(
        model.params, tokens
    )
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), atol=2e-5, rtol=1e-5)
