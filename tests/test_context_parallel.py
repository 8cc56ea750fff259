"""Context-parallel latent attention (k2jax/model/context_parallel.py) on 8 fake CPU devices:
a pool striped over 8 shards gives the attention of the whole sequence, for ragged rows whose
page counts are not multiples of the shard count, queries at different depths, and padding.

The oracle is softmax attention in float64 numpy over each row's keys in sequence order,
gathered through the global block tables (nothing of the module under test)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax.model.context_parallel import context_parallel_attention, striped_local_tables

SHARDS, PAGES_PER_SHARD, PAGE, LAYERS = 8, 6, 4, 2
HEADS, LATENT, ROPE = 3, 16, 8
LENGTHS = [1, 37, 150]  # tokens cached per row: 1, 10 and 38 pages
SCALE = 0.3


def _layout(rng):
    """Global striped block tables (logical page j in shard j mod 8) and their local form."""
    pages = [-(-n // PAGE) for n in LENGTHS]
    width = max(pages)
    tables = np.zeros((len(LENGTHS), width), np.int32)
    for row, count in enumerate(pages):
        for j in range(count):
            shard = j % SHARDS
            local = rng.integers(1, PAGES_PER_SHARD)  # page 0 of each shard is its scratch
            tables[row, j] = shard * PAGES_PER_SHARD + local
    return tables, np.asarray(pages)


def _oracle(q, pool, layer, tables, positions):
    out = np.zeros(q.shape[:3] + (LATENT,))
    for b in range(q.shape[0]):
        rows = pool[layer, tables[b]].reshape(-1, pool.shape[-1]).astype(np.float64)
        for t in range(q.shape[1]):
            pos = positions[b, t]
            if pos < 0:
                continue
            keys = rows[: pos + 1]
            for n in range(HEADS):
                scores = SCALE * keys @ q[b, t, n].astype(np.float64)
                w = np.exp(scores - scores.max())
                out[b, t, n] = (w / w.sum()) @ keys[:, :LATENT]
    return out


def test_a_striped_pool_over_8_shards_attends_like_the_whole_sequence():
    rng = np.random.default_rng(0)
    mesh = jax.make_mesh((SHARDS,), ("context",))
    pool = rng.standard_normal((LAYERS, SHARDS * PAGES_PER_SHARD, PAGE, LATENT + ROPE))
    pool = pool.astype(np.float32)
    tables, pages = _layout(rng)
    local = striped_local_tables(tables, pages, SHARDS, PAGES_PER_SHARD)
    # Decode at the last position, a query halfway in, and a padding query.
    positions = np.asarray([[n - 1, (n - 1) // 2, -1] for n in LENGTHS], np.int32)
    q = rng.standard_normal((len(LENGTHS), 3, HEADS, LATENT + ROPE)).astype(np.float32)
    placed_pool = jax.device_put(pool, NamedSharding(mesh, P(None, "context")))
    placed_tables = jax.device_put(local, NamedSharding(mesh, P(None, "context")))
    for layer in range(LAYERS):
        got = context_parallel_attention(
            q[..., :LATENT],
            q[..., LATENT:],
            placed_pool,
            layer,
            placed_tables,
            positions,
            mesh=mesh,
            axis="context",
            scale=SCALE,
        )
        want = _oracle(q, pool, layer, tables, positions)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    # Each device holds 1/8 of the pool.
    shard_shapes = {s.data.shape for s in placed_pool.addressable_shards}
    assert shard_shapes == {(LAYERS, PAGES_PER_SHARD, PAGE, LATENT + ROPE)}


def test_a_page_outside_its_stripe_is_refused_by_name():
    tables = np.asarray([[0 * PAGES_PER_SHARD + 1, 0 * PAGES_PER_SHARD + 2]], np.int32)
    with pytest.raises(ValueError, match="row 0: logical page 1 is global page 2, in shard 0"):
        striped_local_tables(tables, np.asarray([2]), SHARDS, PAGES_PER_SHARD)
