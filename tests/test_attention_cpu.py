"""The CPU attention kernel (k2jax/kernels/csrc/latent_attention.cc) against float64 softmax
attention over the same pages, for every instruction set this CPU has."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from k2jax.kernels import attention_cpu, cpu_library

SCALE = 0.125


def _supported_isas():
    best = cpu_library.ISAS[cpu_library.best_isa()]
    return [name for name, code in cpu_library.ISAS.items() if name == "auto" or code <= best]


def _reference(q, pages, layer, tables, positions, latent):
    """float64: each query attends to key positions 0..pos of its row's pages."""
    b, t, n, w = q.shape
    k = pages.shape[2]
    out = np.zeros((b, t, n, latent))
    pool = pages[layer].astype(np.float64)
    for bi in range(b):
        rows = pool[tables[bi]].reshape(-1, w)  # this row's keys in sequence order
        for ti in range(t):
            pos = positions[bi, ti]
            if pos < 0:
                continue
            keys = rows[: min(pos + 1, tables.shape[1] * k)]
            scores = SCALE * keys @ q[bi, ti].astype(np.float64).T  # [S, N]
            probs = np.exp(scores - scores.max(0))
            probs /= probs.sum(0)
            out[bi, ti] = probs.T @ keys[:, :latent]
    return out


def _problem(rng, b, t, n, latent, rope, page, table_width, num_pages, dtype, positions):
    w = latent + rope
    pages = rng.standard_normal((2, num_pages, page, w)).astype(dtype)
    tables = np.stack([rng.permutation(num_pages)[:table_width] for _ in range(b)]).astype(np.int32)
    q = rng.standard_normal((b, t, n, w)).astype(np.float32)
    return q, pages, tables, np.asarray(positions, np.int32).reshape(b, t)


def _check(q, pages, tables, positions, latent, isa, layer=1):
    got = jax.jit(
        lambda q, p, tb, pos: attention_cpu.attend(
            q, p, layer, tb, pos, scale=SCALE, latent=latent, isa=isa
        )
    )(q, pages, tables, positions)
    want = _reference(q, np.asarray(pages, np.float32), layer, tables, positions, latent)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=2e-5, err_msg=isa)
    return np.asarray(got)


@pytest.mark.parametrize("isa", _supported_isas())
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
def test_prefill_chunk_and_padding_match_float64(isa, dtype):
    """Several queries per row at their own positions (a prefill chunk), a padding query (zeros),
    heads in blocks of 8, 4 and 1 (13 heads), a width that is not a multiple of 16, keys ending
    mid-page and past a partial block of 8."""
    rng = np.random.default_rng(0)
    positions = [[0, 5, 17, 30, -1], [3, 4, 9, 22, 29]]
    q, pages, tables, pos = _problem(rng, 2, 5, 13, 32, 8, 4, 8, 12, dtype, positions)
    got = _check(q, pages, tables, pos, 32, isa)
    assert not got[0, 4].any()  # the padding query


@pytest.mark.parametrize("isa", _supported_isas())
def test_long_decode_splits_keys_over_threads_and_matches(isa):
    """One query over 2,100 keys (bf16, K2's 512 + 64 width): the keys are split into ranges
    merged by their maxima; sharper scores make the running maximum move between ranges."""
    rng = np.random.default_rng(1)
    q, pages, tables, pos = _problem(
        rng, 1, 1, 8, 512, 64, 16, 140, 150, ml_dtypes.bfloat16, [[2099]]
    )
    _check(q * 4, pages, tables, pos, 512, isa)


def test_batch_of_decode_queries_at_different_lengths():
    rng = np.random.default_rng(2)
    q, pages, tables, pos = _problem(
        rng, 3, 1, 4, 64, 16, 8, 80, 200, ml_dtypes.bfloat16, [[0], [639], [1000]]
    )
    _check(q, pages, tables, pos, 64, "auto", layer=0)


def test_bad_inputs_are_refused_by_name():
    rng = np.random.default_rng(3)
    q, pages, tables, pos = _problem(rng, 1, 1, 2, 32, 8, 4, 2, 3, np.float32, [[3]])
    with pytest.raises(ValueError, match="pages must be"):
        attention_cpu.attend(q, pages[..., :16], 0, tables, pos, scale=1.0, latent=32)
    with pytest.raises(ValueError, match="latent must be in"):
        attention_cpu.attend(q, pages, 0, tables, pos, scale=1.0, latent=41)
    with pytest.raises(ValueError, match="isa must be one of"):
        attention_cpu.attend(q, pages, 0, tables, pos, scale=1.0, latent=32, isa="neon")
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        attention_cpu.attend(q, pages.astype(np.float16), 0, tables, pos, scale=1.0, latent=32)
    bad_table = np.array([[1, 3]], np.int32)  # page 3 is outside a 3-page pool
    with pytest.raises(Exception, match="outside the pool"):
        jax.block_until_ready(
            attention_cpu.attend(q, pages, 0, bad_table, pos, scale=1.0, latent=32)
        )
    with pytest.raises(Exception, match="layer index out of range"):
        jax.block_until_ready(
            attention_cpu.attend(q, pages, jnp.int32(2), tables, pos, scale=1.0, latent=32)
        )
