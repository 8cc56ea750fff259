"""The CPU's fused INT4 kernel (k2jax/kernels/csrc/int4_matvec.cc) against float64 matmuls of
weights that compressed-tensors packed, for every instruction set this CPU has."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from k2jax.kernels import cpu_library, int4_cpu
from k2jax.model.expert_matmul import choose_impl, routed_experts
from k2jax.model.quant import QuantizedWeight

GS = 32


def _experts(rng, e, out, inp, layers=None):
    """compressed-tensors-packed experts: (QuantizedWeight, float64 dense [..., E, O, I])."""
    lead = (e,) if layers is None else (layers, e)
    q = rng.integers(-8, 8, (*lead, out, inp)).astype(np.int8)
    q[..., 7] = -8  # extremes in the top nibble of a word: its top bit clear and set
    q[..., 15] = 7
    scale = rng.uniform(0.01, 0.1, (*lead, out, inp // GS)).astype(ml_dtypes.bfloat16)
    packed = pack_to_int32(torch.from_numpy(q.reshape(-1, out, inp)), 4).numpy()
    packed = packed.reshape(*lead, out, inp // 8)
    dense = q.astype(np.float64) * np.repeat(scale.astype(np.float64), GS, axis=-1)
    return QuantizedWeight(jnp.asarray(packed), jnp.asarray(scale), GS), dense


def _reference(x_RI, ids_P, dense_EOI):
    """y[p] = dense[ids[p]] @ x[p // k] in float64; ids outside [0, E) give zeros."""
    k = ids_P.shape[0] // x_RI.shape[0]
    y = np.zeros((ids_P.shape[0], dense_EOI.shape[1]))
    for p, e in enumerate(ids_P):
        if 0 <= e < dense_EOI.shape[0]:
            y[p] = dense_EOI[e] @ x_RI[p // k].astype(np.float64)
    return y


def _supported_isas():
    best = cpu_library.ISAS[cpu_library.best_isa()]
    return [name for name, code in cpu_library.ISAS.items() if name == "auto" or code <= best]


def test_the_kernel_was_built_and_is_the_cpu_choice():
    """pip install builds it (setup.py); without it the CPU silently takes the slow path."""
    assert cpu_library.available()
    assert cpu_library.best_isa() in ("scalar", "avx2", "avx512")
    words = QuantizedWeight(jnp.zeros((2, 8, 4), jnp.int32), jnp.zeros((2, 8, 1), jnp.bfloat16))
    assert choose_impl(words) == "cpu_kernel"
    other_group = QuantizedWeight(words.packed, jnp.zeros((2, 8, 2), jnp.bfloat16), 16)
    assert choose_impl(other_group) == "words_tiled"


@pytest.mark.parametrize("isa", _supported_isas())
@pytest.mark.parametrize("rows,k,out,inp", [(1, 1, 40, 64), (3, 3, 72, 96), (9, 1, 33, 32)])
def test_kernel_matches_float64_reference(isa, rows, k, out, inp):
    """Pair counts 1-9 cover 1-4 pairs per pass and a remainder; 33, 40 and 72 rows leave part
    of a 32-row work item; ids outside [0, E) (other shards' experts) give zero rows."""
    rng = np.random.default_rng(rows * 100 + out)
    w, dense = _experts(rng, 5, out, inp)
    x = rng.standard_normal((rows, inp)).astype(np.float32)
    ids = rng.integers(-1, 6, rows * k).astype(np.int32)  # -1 and 5 belong to no local expert
    ids[0] = 2
    ids[-1] = 2  # some expert with several pairs
    got = jax.jit(lambda x, i: int4_cpu.project(x, i, w.packed, w.scale, isa=isa))(x, ids)
    want = _reference(x, ids, dense)
    # Sums of at most a few hundred float32 products: relative to the largest output.
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=0, atol=2e-6 * np.abs(want).max(), err_msg=isa
    )
    assert not np.asarray(got)[(ids < 0) | (ids >= 5)].any()


@pytest.mark.parametrize("isa", _supported_isas())
def test_kernel_reads_one_layer_of_a_stack_in_place(isa):
    """A [L, E, O, I] stack with a traced layer index gives that layer's product."""
    rng = np.random.default_rng(5)
    stack, dense = _experts(rng, 4, 64, 128, layers=3)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    ids = np.array([3, 0, 3, 1], np.int32)

    @jax.jit
    def run(layer):
        return int4_cpu.project(x, ids, stack.packed, stack.scale, GS, layer=layer, isa=isa)

    for layer in range(3):
        want = _reference(x, ids, dense[layer])
        got = np.asarray(run(jnp.int32(layer)), np.float64)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_routed_experts_on_a_stack_equals_the_layer():
    """The model passes its MoE experts as a layer stack; cpu_kernel indexes it in place."""
    rng = np.random.default_rng(9)
    weights = [_experts(rng, 6, o, i, layers=2)[0] for o, i in ((64, 96), (64, 96), (96, 64))]
    x = jnp.asarray(rng.standard_normal((3, 96)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 6, (3, 2)), jnp.int32)
    wts = jnp.asarray(rng.uniform(0.1, 1.0, (3, 2)), jnp.float32)
    for layer in range(2):
        stacked = [QuantizedWeight(w.packed, w.scale, GS, jnp.int32(layer)) for w in weights]
        one = [QuantizedWeight(w.packed[layer], w.scale[layer], GS) for w in weights]
        got = routed_experts(x, ids, wts, *stacked, impl="cpu_kernel")
        want = routed_experts(x, ids, wts, *one, impl="naive")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_by_name():
    rng = np.random.default_rng(1)
    w, _ = _experts(rng, 2, 8, 64)
    x = jnp.zeros((2, 64), jnp.float32)
    ids = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="group size 32"):
        int4_cpu.project(x, ids, w.packed, w.scale, 16)
    with pytest.raises(ValueError, match="96 inputs but the weight 64"):
        int4_cpu.project(jnp.zeros((2, 96), jnp.float32), ids, w.packed, w.scale)
    with pytest.raises(ValueError, match="3 pairs do not split evenly over 2 rows"):
        int4_cpu.project(x, jnp.zeros((3,), jnp.int32), w.packed, w.scale)
    with pytest.raises(ValueError, match="isa must be one of"):
        int4_cpu.project(x, ids, w.packed, w.scale, isa="neon")
