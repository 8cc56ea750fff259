"""Every routed-expert formulation equals dequantize-in-float32-then-matmul.

Weights are quantized here and packed by compressed-tensors' own ``pack_to_int32`` (the
checkpoint's packer), with -8 present so some words have the top bit set.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from k2jax.kernels import int4_pallas
from k2jax.model.expert_matmul import IMPLS, choose_impl, routed_experts
from k2jax.model.quant import DenseWeight, FloatWeight, Int4Weight, QuantizedWeight, to_int4_layout

jax.config.update("jax_numpy_rank_promotion", "raise")

D, M, GS = 256, 128, 32


def _quantized(rng, e, out, inp):
    """Packed by compressed-tensors; returns (QuantizedWeight, float32 dense [E, O, I])."""
    q = rng.integers(-8, 8, (e, out, inp)).astype(np.int8)
    q[..., 7] = -8  # nibble 0 in the top position of word 0: offset 8 -> top bit clear; and
    q[..., 15] = 7  # nibble 15 there: the word's top bit set
    scale = rng.uniform(0.01, 0.1, (e, out, inp // GS)).astype(ml_dtypes.bfloat16)
    packed = pack_to_int32(torch.from_numpy(q), 4).numpy()
    assert packed.dtype == np.int32 and (packed < 0).any()
    dense = q.astype(np.float32) * np.repeat(scale.astype(np.float32), GS, axis=-1)
    w = QuantizedWeight(jnp.asarray(packed), jnp.asarray(scale), GS)
    return w, dense


@pytest.fixture(scope="module")
def experts():
    rng = np.random.default_rng(0)
    gate, gate_f = _quantized(rng, 6, M, D)
    up, up_f = _quantized(rng, 6, M, D)
    down, down_f = _quantized(rng, 6, D, M)
    return (gate, up, down), (gate_f, up_f, down_f)


def _reference(x, ids, wts, dense, offset, act_dtype=None):
    """float64 SwiGLU of float32-dequantized experts; act_dtype rounds the matmul inputs."""

    def rnd(a):
        return a if act_dtype is None else np.asarray(a, act_dtype).astype(np.float64)

    gate_f, up_f, down_f = (np.asarray(a, np.float64) for a in dense)
    y = np.zeros((x.shape[0], down_f.shape[1]))
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k] - offset
            if not 0 <= e < gate_f.shape[0]:
                continue
            xt = rnd(x[t].astype(np.float64))
            g, u = gate_f[e] @ xt, up_f[e] @ xt
            h = rnd(g / (1 + np.exp(-g)) * u)
            y[t] += wts[t, k] * (down_f[e] @ h)
    return y


def _inputs(t, k, num_ids, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, D)).astype(np.float32)
    # Few distinct experts so some local experts get no tokens (empty groups).
    ids = rng.choice(num_ids, size=(t, k), replace=True).astype(np.int32)
    wts = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    return x, ids, wts


def test_int4_layout_is_exact(experts):
    (gate, _, down), (gate_f, _, down_f) = experts
    for w, dense in ((gate, gate_f), (down, down_f)):
        np.testing.assert_array_equal(np.asarray(w.dequantize()), dense)
        np.testing.assert_array_equal(np.asarray(to_int4_layout(w).dequantize()), dense)


@pytest.mark.parametrize("layout", ["words", "int4"])
@pytest.mark.parametrize("t,k,offset", [(1, 2, 0), (6, 4, 3)])
def test_formulations_match_float32_reference(experts, layout, t, k, offset):
    weights, dense = experts
    if layout == "int4":
        weights = tuple(to_int4_layout(w) for w in weights)
        impls = ("naive", "pallas")
    else:
        impls = ("naive", "cpu_kernel", "words_tiled")
    # ids span [0, 12): with offset 3 the choices below 3 and from 9 on belong to other shards.
    x, ids, wts = _inputs(t, k, 12 if offset else 4, seed=t * 10 + k)
    for impl in impls:
        # The Pallas kernel feeds the MXU bf16 activations; its reference rounds them alike.
        act = ml_dtypes.bfloat16 if impl == "pallas" else None
        x_in = x if act is None else x.astype(act).astype(np.float32)
        y = routed_experts(
            jnp.asarray(x_in),
            jnp.asarray(ids),
            jnp.asarray(wts),
            *weights,
            expert_offset=offset,
            impl=impl,
        )
        ref = _reference(x_in, ids, wts, dense, offset, act_dtype=act)
        scale = np.abs(ref).max() + 1e-30
        # float32 rounding of sums over a few hundred terms; bf16 rounding of h (pallas) can
        # move a product by half a bf16 ulp (2^-9) when f32 and f64 round differently.
        tol = 2e-3 if act is not None else 2e-6
        np.testing.assert_allclose(
            np.asarray(y, np.float64) / scale, ref / scale, atol=tol, err_msg=impl
        )


@pytest.mark.parametrize("impl", ["words_tiled", "pallas"])
def test_an_expert_shard_takes_its_pairs_in_passes_of_its_expected_share(experts, impl):
    """Under expert parallelism (6 local experts of 96) a shard expects 1/16 of the pairs, so
    its arrays hold passes of 2x that (``pass_capacity``), not every pair of the batch: the
    largest [rows, D] array is smaller than the pairs. Routing skewed onto this shard (every
    pair local: many passes) and routing that leaves it nearly idle: ``words_tiled`` (float32)
    equals the float64 reference; ``pallas`` (bf16 activations) equals its own one-pass result,
    which test_formulations_match_float32_reference checks against it, to float32 rounding
    (the passes add onto the tokens one after another, one pass in one one-hot matmul: the
    same products summed in another order)."""
    weights, dense = experts
    if impl == "pallas":
        weights = tuple(to_int4_layout(w) for w in weights)
    t, k, offset = 64, 4, 12
    for local_share in (1.0, 0.05):
        x, _, wts = _inputs(t, k, 6, seed=7)
        rng = np.random.default_rng(int(local_share * 100))
        local = rng.random((t, k)) < local_share
        ids = np.where(local, offset + rng.integers(0, 6, (t, k)), rng.integers(20, 96, (t, k)))
        ids = ids.astype(np.int32)

        def run(x, ids=ids, wts=wts, total=96):
            return routed_experts(
                x, ids, wts, *weights, expert_offset=offset, num_experts_total=total, impl=impl
            )

        if impl == "pallas":
            x_bf16 = jnp.asarray(x.astype(ml_dtypes.bfloat16).astype(np.float32))
            one_pass = np.asarray(run(x_bf16, total=None), np.float64)  # every pair in one pass
            scale = np.abs(one_pass).max() + 1e-30
            passes = np.asarray(run(x_bf16), np.float64)
            np.testing.assert_allclose(passes / scale, one_pass / scale, atol=2e-6, rtol=0)
            continue
        y = run(jnp.asarray(x))
        ref = _reference(x, ids, wts, dense, offset)
        scale = np.abs(ref).max() + 1e-30
        np.testing.assert_allclose(np.asarray(y, np.float64) / scale, ref / scale, atol=2e-6)
    jaxpr = jax.make_jaxpr(run)(jnp.asarray(x)).jaxpr
    rows = [
        v.aval.shape[0]
        for e in _walk(jaxpr)
        for v in e.outvars
        if v.aval.ndim == 2 and v.aval.shape[1] == D
    ]
    assert max(rows) < t * k  # 256 pairs; a pass is 32 (pallas) or 40 (words_tiled) + padding


def _walk(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.core.subjaxprs(e) if hasattr(jax.core, "subjaxprs") else ():
            yield from _walk(sub)
        for param in e.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _walk(inner)


@pytest.mark.parametrize("tm", [8, 1])
def test_pallas_kernel_exact_per_projection(experts, tm):
    """The kernel alone, bf16 activations: equal to float32 dequantize-then-matmul; with
    8-row tiles and with one-row tiles (one token: rows viewed as [R, 1, I])."""
    (gate, _, down), (gate_f, _, down_f) = experts
    rng = np.random.default_rng(3)
    for w, dense in ((gate, gate_f), (down, down_f)):
        w4 = to_int4_layout(w)
        inp = dense.shape[2]
        tile_expert = np.array([4, 0, 0, 2], np.int32)  # tile 3 is past num_tiles: skipped
        x = rng.standard_normal((4 * tm, inp)).astype(ml_dtypes.bfloat16)
        out = int4_pallas.grouped_int4_matmul(
            jnp.asarray(x),
            jnp.asarray(tile_expert),
            jnp.array([3], jnp.int32),
            w4.values,
            w4.scale,
            tm=tm,
            interpret=True,
        )
        xf = x.astype(np.float64)
        ref = np.concatenate(
            [
                xf[tm * i : tm * (i + 1)] @ dense[e].T.astype(np.float64)
                for i, e in enumerate(tile_expert[:3])
            ]
            + [np.zeros((tm, dense.shape[1]))]
        )
        np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_every_impl_is_covered_and_choice_is_by_layout():
    assert set(IMPLS) == {"naive", "cpu_kernel", "words_tiled", "pallas", "all_experts"}
    words = QuantizedWeight(jnp.zeros((2, 8, 4), jnp.int32), jnp.zeros((2, 8, 1), jnp.bfloat16))
    want = "cpu_kernel" if jax.default_backend() == "cpu" else "words_tiled"
    assert choose_impl(words) == want
    int4 = to_int4_layout(words)
    assert int4.layout == "int4" and int4.shape == words.shape == (2, 8, 32)
    if jax.default_backend() == "cpu":
        assert choose_impl(int4) == "naive"  # off TPU no kernel takes the int4 layout
    assert choose_impl(DenseWeight(jnp.zeros((2, 8, 32)))) == "naive"
    # training's float master weights (k2jax.train; checked against words in tests/test_qat.py)
    assert choose_impl(FloatWeight(jnp.zeros((2, 8, 32)))) == "all_experts"


def test_every_layout_offers_the_same_weight_interface(experts):
    """Per-layer view, gathered experts, one expert, dense form and device bytes agree between
    the layouts and with the float32 dequantized weights."""
    (gate, _, _), (gate_f, _, _) = experts
    stack = QuantizedWeight(jnp.stack([gate.packed, gate.packed]), jnp.stack([gate.scale] * 2), GS)
    forms = {
        "words": QuantizedWeight(stack.packed, stack.scale, GS, jnp.int32(1)),
        "int4": Int4Weight(*jax.tree.leaves(to_int4_layout(stack)), jnp.int32(1)),
        "dense": DenseWeight(jnp.stack([jnp.asarray(gate_f)] * 2), jnp.int32(1)),
    }
    ids = jnp.asarray([[4, 0], [2, 2]], jnp.int32)
    for name, w in forms.items():
        assert w.layout == name and w.shape == gate_f.shape and w.num_experts == 6
        np.testing.assert_array_equal(np.asarray(w.dequantize()), gate_f, err_msg=name)
        np.testing.assert_array_equal(np.asarray(w.unstacked().dequantize()), gate_f)
        np.testing.assert_array_equal(np.asarray(w.take(ids).dequantize()), gate_f[ids])
        np.testing.assert_array_equal(np.asarray(w.expert(jnp.int32(3))), gate_f[3])
        leaves = jax.tree.leaves(w)
        assert w.device_bytes() == sum(a.nbytes for a in leaves if a.ndim), name
    # 4.5 bits per weight in the words layout on every backend (the int4 layout too on TPU,
    # which packs int4; the CPU stores an int4 element in a byte).
    assert forms["words"].device_bytes() * 8 / (2 * np.prod(gate_f.shape)) == 4.5


def test_layer_stack_is_read_in_place_and_equals_the_layer(experts):
    """``Int4Weight(stack, scale_stack, layer)``: the Pallas kernel indexes the stack itself
    (no per-layer copy, see docs/sharding.md) and every impl gives layer ``layer``'s result."""
    (gate, up, down), _ = experts
    one = [to_int4_layout(w) for w in (gate, up, down)]
    # A 3-layer stack whose layer 1 is the fixture; the other layers are different weights.
    stacked = [
        Int4Weight(
            jnp.stack([-w.values, w.values, -w.values]),
            jnp.stack([w.scale * 2, w.scale, w.scale]),
            jnp.int32(1),
        )
        for w in one
    ]
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((3, D)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 6, (3, 2)), jnp.int32)
    wts = jnp.asarray(rng.uniform(0.1, 1.0, (3, 2)), jnp.float32)
    for impl in ("pallas", "naive"):
        want = routed_experts(x, ids, wts, *one, impl=impl)
        got = routed_experts(x, ids, wts, *stacked, impl=impl)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=impl)
