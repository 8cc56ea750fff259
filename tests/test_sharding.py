"""Sharded equals single-device: logits of a tiny K2 on 8 CPU devices, over several meshes.

Float32 throughout; the only differences allowed are summation order in the collectives.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax.sharding import NamedSharding, PartitionSpec

from k2jax import model as k2model
from k2jax.model.config import Config
from k2jax.serving.loaded_model import Model
from sharding import collectives, rules
from sharding.mesh import make_mesh, parse_mesh

# 8 heads and 16 experts so that every test mesh divides them.
TINY = {"num_attention_heads": 8, "num_key_value_heads": 8}
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def cfg() -> Config:
    return Config.from_hf(reference.hf_config_dict(**TINY))


@pytest.fixture(scope="module")
def params(cfg):
    return k2model.init_params(cfg, jax.random.key(7), jnp.float32)


@pytest.fixture(scope="module")
def tokens(cfg):
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 8))


@pytest.fixture(scope="module")
def single(cfg, params, tokens):
    return Model(cfg, params, jnp.float32).logits(tokens)


def _sharded_model(cfg, params, shape, strategy="decode"):
    mesh = make_mesh(*shape)
    placed = rules.shard_params(params, cfg, mesh, strategy)
    return Model(cfg, placed, jnp.float32, mesh, rules.flax_rules(strategy))


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2), (2, 2, 2), (1, 1, 8)])
def test_sharded_logits_equal_single_device(cfg, params, tokens, single, shape):
    model = _sharded_model(cfg, params, shape)
    np.testing.assert_allclose(model.logits(tokens), single, **TOL)
    # Each expert array is really split: a device holds 1/(expert*tensor) of it.
    ways = shape[1] * shape[2]
    experts = model.params["moe_layers"]["moe"]["experts"]
    for name, arr in experts.items():
        assert {s.data.nbytes for s in arr.addressable_shards} == {arr.nbytes // ways}, name
    # Dense weights are split over expert x tensor too: w_o [L, heads / (expert x tensor), ...].
    w_o = model.params["moe_layers"]["attn"]["w_o"]
    layers, heads, v_dim, hidden = w_o.shape
    assert {s.data.shape for s in w_o.addressable_shards} == {
        (layers, heads // ways, v_dim, hidden)
    }
    shared = model.params["moe_layers"]["moe"]["shared"]["w_down"]
    assert {s.data.nbytes for s in shared.addressable_shards} == {shared.nbytes // ways}


def test_prefill_strategy_logits_equal_single_device(cfg, params, tokens, single):
    # Batch 4 over data x expert = 4: attention split by batch, experts gather tokens.
    model = _sharded_model(cfg, params, (1, 4, 2), "prefill")
    np.testing.assert_allclose(model.logits(tokens), single, **TOL)


def test_expert_weights_never_gathered(cfg, params, tokens):
    """Each device applies its own experts: no collective moves an expert array."""
    model = _sharded_model(cfg, params, (1, 8, 1))

    def run(p, tokens_BT):
        pos_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x_BTD, _ = k2model.forward(p, tokens_BT, pos_BT, cfg=cfg, dtype=jnp.float32)
        return k2model.lm_logits(p, x_BTD, cfg=cfg, dtype=jnp.float32)

    with jax.set_mesh(model.mesh), nn.logical_axis_rules(model.rules):
        arg = model._replicated(np.asarray(tokens, np.int32))
        hlo = jax.jit(run).lower(model.params, arg).compile().as_text()
    packed = model.params["moe_layers"]["moe"]["experts"]["gate_packed"]
    full = ",".join(str(d) for d in packed.shape[1:])
    gathers = [ln for ln in hlo.splitlines() if "all-gather(" in ln and f"[{full}]" in ln]
    assert not gathers, gathers[:3]
    # The routed experts' one psum, over all 8 devices of the expert axis (XLA merges the shared
    # expert's reduction, now over the same devices, into it).
    combine = [ln for ln in hlo.splitlines() if "all-reduce(" in ln and "routed_experts" in ln]
    assert len(combine) == 1, combine
    assert collectives.group_size(combine[0], 8) == 8, combine


def test_non_dividing_mesh_is_refused_with_names_and_sizes(cfg):
    mesh = make_mesh(expert=7, devices=jax.devices()[:7])
    with pytest.raises(rules.ShardingError) as err:
        rules.param_shardings(cfg, mesh, jnp.float32)
    msg = str(err.value)
    assert "experts" in msg and "16" in msg and "expert=7" in msg and "moe_layers" in msg


def test_real_config_over_7_devices_names_384_experts():
    cfg = Config.from_hf("/work/shared/k2/kimi-k2-thinking.config.json")
    mesh = make_mesh(expert=7, devices=jax.devices()[:7])
    with pytest.raises(rules.ShardingError, match=r"size 384 .* 384 is not divisible by 7"):
        rules.param_shardings(cfg, mesh)


def test_two_logical_axes_on_one_mesh_axis_are_refused():
    mesh = make_mesh(expert=8)
    table = {**rules.rules_for("decode"), "v_head_dim": ("expert",)}
    with pytest.raises(rules.ShardingError, match="'heads' and 'v_head_dim' both map"):
        rules.spec_for(("heads", "v_head_dim", "embed"), (8, 16, 64), mesh, table, "w_o")


def test_spec_for_unknown_logical_axis():
    with pytest.raises(rules.ShardingError, match="no rule"):
        rules.spec_for(("nope",), (8,), make_mesh(tensor=8), rules.rules_for("decode"))


def test_make_mesh_product_must_match_devices():
    with pytest.raises(ValueError, match="= 4 devices, but 8 devices"):
        make_mesh(data=2, expert=2)
    mesh = make_mesh(1, 4, 2)
    assert mesh.axis_names == ("data", "expert", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_parse_mesh():
    assert parse_mesh("expert=32") == {"data": 1, "expert": 32, "tensor": 1}
    with pytest.raises(ValueError, match="pipeline=2"):
        parse_mesh("pipeline=2")


def test_param_shardings_cover_every_param(cfg):
    mesh = make_mesh(1, 4, 2)
    shardings = rules.param_shardings(cfg, mesh, jnp.float32)
    shapes = k2model.abstract_params(cfg, jnp.float32)
    assert jax.tree.structure(shardings) == jax.tree.structure(shapes)
    emb = shardings["embed"]
    assert isinstance(emb, NamedSharding)
    assert emb.spec == PartitionSpec(("expert", "tensor"), None)


def test_dense_split_falls_back_to_the_axes_that_divide():
    """4 heads over expert=8 cannot split: replicated; over expert=2 x tensor=4 (8 ways) they
    split over tensor alone. Expert stacks never fall back (the refusal above)."""
    decode = rules.rules_for("decode")
    spec = rules.spec_for(("heads", "v_head_dim"), (4, 16), make_mesh(expert=8), decode)
    assert spec == PartitionSpec(None, None)
    spec = rules.spec_for(("heads", "v_head_dim"), (4, 16), make_mesh(1, 2, 4), decode)
    assert spec == PartitionSpec("tensor", None)
    spec = rules.spec_for(("heads", "v_head_dim"), (8, 16), make_mesh(1, 2, 4), decode)
    assert spec == PartitionSpec(("expert", "tensor"), None)
    # Over expert=4 x tensor=2: 6 divides by tensor only, 12 by expert (the larger) first.
    mesh = make_mesh(1, 4, 2)
    assert rules.spec_for(("mlp",), (6,), mesh, decode) == PartitionSpec("tensor")
    assert rules.spec_for(("mlp",), (12,), mesh, decode) == PartitionSpec("expert")
