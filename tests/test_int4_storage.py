"""INT4 experts stay INT4 on the device, unpack exactly, and cost follows the chosen experts."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

import k2jax
from k2jax.kernels import int4_format
from k2jax.model import expert_matmul as em
from k2jax.model import quant
from k2jax.model.expert_matmul import routed_experts


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ref = reference.build(seed=11)
    return k2jax.load(reference.write_checkpoint(ref, tmp_path_factory.mktemp("m")))


def test_expert_weights_take_at_most_4_6_bits_on_device(model):
    experts = model.params["moe_layers"]["moe"]["experts"]
    assert experts["gate_packed"].dtype == jnp.int32
    assert experts["gate_scale"].dtype == jnp.bfloat16
    bits = model.expert_bits_per_weight()
    assert bits <= 4.6
    # Computed from the device's own byte counts, not from numpy's idea of the dtype.
    device_bytes = sum(a.on_device_size_in_bytes() for a in jax.tree.leaves(experts))
    weights = sum(a.size * 8 for k, a in experts.items() if k.endswith("_packed"))
    assert bits == pytest.approx(device_bytes * 8 / weights)


def test_unpack_equals_compressed_tensors_on_every_word():
    rng = np.random.RandomState(0)
    values = rng.randint(-8, 8, size=(48, 256)).astype(np.int8)
    values[:, 7::8] = -8  # the top nibble 0 ...
    values[::2, 7::8] = 7  # ... and 15: words with the top bit set (negative int32)
    packed = pack_to_int32(torch.from_numpy(values), 4)
    assert (packed < 0).any() and (packed >= 0).any()
    want = unpack_from_int32(packed, 4, torch.Size(values.shape)).numpy()
    got = np.asarray(int4_format.unpack_int4(jnp.asarray(packed.numpy())))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(int4_format.pack_int4_numpy(values), packed.numpy())


def test_dequantize_matches_compressed_tensors():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    packed = reference.pack_int4(w)
    want = reference.unpack_int4(packed).numpy()
    qw = quant.QuantizedWeight(
        jnp.asarray(packed["weight_packed"].numpy()),
        jnp.asarray(packed["weight_scale"].float().numpy()).astype(jnp.bfloat16),
        32,
    )
    np.testing.assert_array_equal(np.asarray(qw.dequantize(jnp.float32)), want)


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _walk(sub)


def _expert_work(num_experts: int, impl: str) -> tuple[int, int]:
    """(dot multiply-adds, largest float intermediate) of the routed-expert step, read from its
    jaxpr: 8 tokens x top-4 over ``num_experts`` packed experts.

    The jaxpr is what the formulation asks for, loop bodies included; XLA's own cost analysis
    is not used because it charges a fused convert-then-slice of the scale stack at full size.
    """
    d, m, t, k = 64, 64, 8, 4

    def stack(o, i):
        return quant.QuantizedWeight(
            jnp.zeros((num_experts, o, i // 8), jnp.int32),
            jnp.zeros((num_experts, o, i // 32), jnp.bfloat16),
        )

    args = (
        jnp.ones((t, d), jnp.float32),
        jnp.zeros((t, k), jnp.int32),
        jnp.ones((t, k), jnp.float32),
        stack(m, d),
        stack(m, d),
        stack(d, m),
    )
    closed = jax.make_jaxpr(lambda *a: routed_experts(*a, impl=impl))(*args)
    macs, largest = 0, 0
    for eqn in _walk(closed.jaxpr):
        for var in eqn.outvars:
            aval = var.aval
            if hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.floating):
                largest = max(largest, int(np.prod(aval.shape)))
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contracted = int(np.prod([lhs[i] for i in lhs_contract]))
            macs += int(np.prod(eqn.outvars[0].aval.shape)) * contracted
    return macs, largest


@pytest.mark.parametrize("impl", ["naive", "words_tiled"])
def test_expert_cost_follows_chosen_experts_not_expert_count(impl):
    """16x the experts at the same tokens and top-k: no more matmul work, no bigger widened
    array. (``jax.lax.ragged_dot`` over all experts, once tried for CPU prefill, fails this.)"""
    assert _expert_work(64, impl) == _expert_work(1024, impl)


def test_counter_example_dense_over_all_experts_fails_the_measure():
    """The measure can fail: computing every expert for every token grows with E."""

    def dense_all(num_experts):
        x = jnp.ones((8, 64))
        w = jnp.zeros((num_experts, 64, 64))
        closed = jax.make_jaxpr(lambda x, w: jnp.einsum("TD,EMD->TEM", x, w))(x, w)
        return [e.outvars[0].aval.size for e in _walk(closed.jaxpr)]

    assert dense_all(64) != dense_all(1024)


def test_tiles_are_bounded_by_pairs_not_experts():
    ids = jnp.zeros((8, 4), jnp.int32)
    mine = jnp.ones((8, 4), bool)
    keys = {e: em._sorted_keys(ids, mine, e)[1] for e in (64, 1024)}
    rows = {e: em._tiles_of_sorted(keys[e], e, 64).rows for e in (64, 1024)}
    assert rows[64] == rows[1024] <= 32 + 32 * 63 + 63


def test_int4_runtime_layout_gives_the_same_logits(tmp_path):
    """The TPU resident layout (native int4, repacked once at load) computes the same model,
    on one device and expert-parallel on a mesh (the Int4Weight pytrees go through shard_map)."""
    from sharding.mesh import make_mesh

    path = reference.write_checkpoint(reference.build(seed=12), tmp_path / "ckpt")
    tokens = np.random.RandomState(0).randint(0, 256, (2, 6))
    words = k2jax.load(path, dtype="float32").logits(tokens)
    single = k2jax.load(path, dtype="float32", expert_layout="int4")
    assert "gate_values" in single.params["moe_layers"]["moe"]["experts"]
    np.testing.assert_allclose(single.logits(tokens), words, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(single.logits(tokens[:, :2]), words[:, :2], atol=2e-5, rtol=1e-5)
    mesh = make_mesh(data=1, expert=4, tensor=2)
    sharded = k2jax.load(path, dtype="float32", mesh=mesh, expert_layout="int4")
    values = sharded.params["moe_layers"]["moe"]["experts"]["gate_values"]
    assert values.sharding.shard_shape(values.shape)[1] == values.shape[1] // 8
    np.testing.assert_allclose(sharded.logits(tokens), words, atol=2e-5, rtol=1e-5)
