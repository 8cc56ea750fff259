"""Context-parallel latent attention (k2jax/model/context_parallel.py) on 8 fake CPU devices:
a pool striped over 8 shards, written and attended shard by shard, gives the attention of the
whole sequence, for ragged rows whose page counts are not multiples of the shard count,
queries at different depths, and padding; the Pallas kernel's log-sum-exp form (TPU
interpreter) gives each shard's partial.

The oracles are numpy: the pool after the write set by index, and softmax attention in float64
over each row's keys in sequence order, gathered through the global block tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax.kernels import mla_pallas
from k2jax.model import context_parallel

SHARDS, PAGES_PER_SHARD, PAGE, LAYERS = 8, 6, 4, 2
HEADS, LATENT, ROPE = 3, 16, 8
LENGTHS = [1, 37, 150]  # tokens cached per row: 1, 10 and 38 pages
SCALE = 0.3


def _striped_tables(rng, lengths=LENGTHS):
    """Global block tables whose logical page j is a page of shard j mod 8 (never a shard's
    first page, its scratch page)."""
    pages = [-(-n // PAGE) for n in lengths]
    tables = np.zeros((len(lengths), max(pages)), np.int32)
    for row, count in enumerate(pages):
        for j in range(count):
            local = rng.choice(np.arange(1, PAGES_PER_SHARD), replace=False)
            tables[row, j] = (j % SHARDS) * PAGES_PER_SHARD + local
    return tables


def _oracle(q, pool, layer, tables, positions):
    """(out [B, T, N, LATENT], lse [B, T, N]) in float64; zeros and -inf for padding."""
    out = np.zeros(q.shape[:3] + (LATENT,))
    lse = np.full(q.shape[:3], -np.inf)
    for b in range(q.shape[0]):
        rows = pool[layer, tables[b]].reshape(-1, pool.shape[-1]).astype(np.float64)
        for t in range(q.shape[1]):
            pos = positions[b, t]
            if pos < 0:
                continue
            keys = rows[: pos + 1]
            for n in range(q.shape[2]):
                scores = SCALE * keys @ q[b, t, n].astype(np.float64)
                w = np.exp(scores - scores.max())
                out[b, t, n] = (w / w.sum()) @ keys[:, :LATENT]
                lse[b, t, n] = scores.max() + np.log(w.sum())
    return out, lse


def test_stripe_positions_count_each_shards_visible_keys():
    """A query's local position is (the number of its shard's keys at or before it) - 1,
    counted by brute force over every position of 7 pages, 3 shards, pages of 4."""
    shards, page = 3, 4
    positions = np.arange(-1, 7 * page)[None]
    for shard in range(shards):
        got = np.asarray(context_parallel.stripe_positions(positions, shard, shards, page))[0]
        for pos, local in zip(positions[0], got, strict=True):
            keys = [k for k in range(pos + 1) if (k // page) % shards == shard]
            assert local == len(keys) - 1, (shard, pos)


def test_a_striped_pool_over_8_shards_writes_and_attends_like_the_whole_sequence():
    rng = np.random.default_rng(0)
    mesh = jax.make_mesh((SHARDS,), ("context",))
    pool = rng.standard_normal((LAYERS, SHARDS * PAGES_PER_SHARD, PAGE, LATENT + ROPE))
    pool = pool.astype(np.float32)
    tables = _striped_tables(rng)
    # Decode at the last position, a query halfway in, and a padding query; each real query
    # writes its own latent first.
    positions = np.asarray([[n - 1, (n - 1) // 2, -1] for n in LENGTHS], np.int32)
    q = rng.standard_normal((len(LENGTHS), 3, HEADS, LATENT + ROPE)).astype(np.float32)
    latents = rng.standard_normal((len(LENGTHS), 3, LATENT + ROPE)).astype(np.float32)
    placed = jax.device_put(pool, NamedSharding(mesh, P(None, "context")))
    for layer in range(LAYERS):
        with jax.set_mesh(mesh):
            got, placed = context_parallel.write_and_attend(
                q[..., :LATENT],
                q[..., LATENT:],
                latents,
                positions,
                tables,
                placed,
                layer,
                axes=("context",),
                scale=SCALE,
            )
        for b, t in zip(*np.nonzero(positions >= 0), strict=True):
            pos = positions[b, t]
            pool[layer, tables[b, pos // PAGE], pos % PAGE] = latents[b, t]
        scratch = np.arange(SHARDS) * PAGES_PER_SHARD
        kept = np.ones(pool.shape[1], bool)
        kept[scratch] = False  # what scratch pages hold is unspecified
        np.testing.assert_array_equal(np.asarray(placed)[:, kept], pool[:, kept])
        want, _ = _oracle(q, pool, layer, tables, positions)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    # Each device holds 1/8 of the pool.
    shard_shapes = {s.data.shape for s in placed.addressable_shards}
    assert shard_shapes == {(LAYERS, PAGES_PER_SHARD, PAGE, LATENT + ROPE)}


@pytest.mark.parametrize("page", [16, 64])
def test_the_pallas_kernel_returns_each_shards_log_sum_exp(page):
    """The kernel's ``return_lse`` form over one shard's local table at local positions (TPU
    interpreter, out-of-bounds reads raise): the normalized output and the log-sum-exp of the
    shard's own keys, against float64 numpy over exactly those keys."""
    rng = np.random.default_rng(page)
    shards, shard, heads = 4, 1, 8
    lengths = [5 * page + 3, page // 2, 0]  # ragged; the last row is padding only
    width = -(-max(lengths) // page)
    pool = rng.standard_normal((1, 4 * width, page, LATENT + ROPE)).astype(np.float32)
    # This shard's pages of each row: logical pages 1, 5, ... (local 0 is its scratch page).
    local = np.zeros((len(lengths), -(-width // shards)), np.int32)
    for row, n in enumerate(lengths):
        owned = range(shard, -(-n // page), shards)
        local[row, : len(owned)] = 1 + rng.permutation(pool.shape[1] - 1)[: len(owned)]
    positions = np.asarray([[n - 1 if n else -1] for n in lengths], np.int32)
    local_pos = context_parallel.stripe_positions(jnp.asarray(positions), shard, shards, page)
    q = rng.standard_normal((len(lengths), 1, heads, LATENT + ROPE)).astype(np.float32)
    out, lse = mla_pallas.paged_mla_attention(
        jnp.asarray(q[..., :LATENT]),
        jnp.asarray(q[..., LATENT:]),
        jnp.asarray(pool),
        0,
        jnp.asarray(local),
        local_pos,
        scale=SCALE,
        return_lse=True,
    )
    # The oracle: each row's keys that this shard holds, in order, all visible to its query.
    for b, n in enumerate(lengths):
        keys = np.concatenate(
            [pool[0, local[b, i]] for i in range(len(range(shard, -(-n // page), shards)))]
            or [np.zeros((0, LATENT + ROPE), np.float32)]
        ).astype(np.float64)
        keys = keys[: int(local_pos[b, 0]) + 1]
        if not len(keys):
            assert np.all(np.asarray(out[b]) == 0)
            assert np.all(np.asarray(lse[b]) == context_parallel.NEG_INF)
            continue
        scores = SCALE * keys @ q[b, 0].astype(np.float64).T  # [S, heads]
        top = scores.max(axis=0)
        w = np.exp(scores - top)
        np.testing.assert_allclose(
            np.asarray(out[b, 0]), (w / w.sum(0)).T @ keys[:, :LATENT], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(lse[b, 0]), top + np.log(w.sum(0)), rtol=1e-5, atol=1e-5
        )


def test_shards_merged_through_the_kernel_give_the_whole_sequences_attention():
    """``write_and_attend`` with the Pallas kernel as each shard's attention (interpreted), 8
    shards: the merge of their outputs by log-sum-exp is the whole-sequence softmax."""
    rng = np.random.default_rng(3)
    mesh = jax.make_mesh((SHARDS,), ("context",))
    pool = rng.standard_normal((1, SHARDS * PAGES_PER_SHARD, PAGE, LATENT + ROPE))
    pool = pool.astype(np.float32)
    tables = _striped_tables(rng)
    positions = np.asarray([[n - 1] for n in LENGTHS], np.int32)
    # Each query rewrites its own key unchanged, so the pool stays the oracle's.
    latents = np.stack(
        [pool[0, tables[b, p // PAGE], p % PAGE][None] for b, p in enumerate(positions[:, 0])]
    )
    q = rng.standard_normal((len(LENGTHS), 1, HEADS, LATENT + ROPE)).astype(np.float32)
    kernel = mla_pallas.paged_mla_attention
    with jax.set_mesh(mesh):
        got, _ = context_parallel.write_and_attend(
            q[..., :LATENT],
            q[..., LATENT:],
            latents,
            positions,
            tables,
            jax.device_put(pool, NamedSharding(mesh, P(None, "context"))),
            0,
            axes=("context",),
            scale=SCALE,
            attend_shard=lambda *a: kernel(*a, scale=SCALE, return_lse=True),
        )
    want, _ = _oracle(q, pool, 0, tables, positions)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
