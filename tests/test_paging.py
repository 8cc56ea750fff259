"""Pages: the host allocator's invariants, the device cache's layout, and absorbed attention
over a paged cache equal to naive attention over the same latents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.model import attention, kv_cache
from k2jax.model.attention import MLAttention
from k2jax.model.config import Config
from k2jax.serving.page_allocator import (
    OutOfPages,
    PageAllocator,
    PartitionedAllocator,
    StripedAllocator,
    pages_for,
)


def _random_growth(alloc, rng, steps: int, seqs: int, scratch: set[int], check=None):
    """Grow and free ``seqs`` sequences at random for ``steps`` steps, checking after each
    growth that no page is scratch or owned twice and that pages are conserved; an
    allocation that fails changes nothing. ``check(table)`` checks each new table too.
    Returns the sequences still holding pages."""
    usable = alloc.num_pages - len(scratch)
    lengths: dict[int, int] = {}
    for _ in range(steps):
        seq = int(rng.integers(seqs))
        if rng.random() < 0.25:
            alloc.free(seq)
            lengths.pop(seq, None)
            continue
        want = lengths.get(seq, 0) + int(rng.integers(1, 6))
        free_before = alloc.num_free
        try:
            table = alloc.ensure(seq, want)
        except OutOfPages:
            assert alloc.num_free == free_before  # all or nothing
            continue
        lengths[seq] = want
        assert len(table) == pages_for(want, alloc.page_size)
        if check is not None:
            check(table)
        owned = [p for s in lengths for p in alloc.pages(s)]
        assert not scratch & set(owned)
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert len(owned) + alloc.num_free == usable
    return list(lengths)


def test_allocator_never_hands_out_scratch_or_a_live_page():
    alloc = PageAllocator(num_pages=9, page_size=4)
    _random_growth(alloc, np.random.default_rng(0), 400, 6, {0})


def test_allocator_errors_and_tables():
    alloc = PageAllocator(num_pages=4, page_size=2)
    assert alloc.ensure("a", 3) == [1, 2]
    with pytest.raises(OutOfPages, match="needs 2 more page"):
        alloc.ensure("b", 4)
    assert alloc.pages("b") == []
    np.testing.assert_array_equal(alloc.block_table("a", 4), [1, 2, 0, 0])
    alloc.free("a")
    assert alloc.num_free == 3
    with pytest.raises(ValueError, match="page 0 is scratch"):
        PageAllocator(num_pages=1, page_size=2)


def test_a_partitioned_pool_keeps_each_sequence_in_its_rows_shard():
    """4 shards of 8 pages: rows 0-1 are shard 0, rows 6-7 shard 3; a sequence's pages (global
    ids) all lie in its shard's range, never on a shard's first (scratch) page, and running
    out in one shard leaves the others untouched."""
    alloc = PartitionedAllocator(32, page_size=4, shards=4)
    assert [alloc.shard_of_slot(s, 8) for s in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    for seq, shard in (("a", 0), ("b", 3), ("c", 3)):
        alloc.start(seq, [], [], shard)
    alloc.ensure("a", 9)  # 3 pages
    alloc.ensure("b", 12)
    assert alloc.pages("a") == [1, 2, 3]
    assert alloc.pages("b") == [25, 26, 27]
    table = alloc.block_table("b", 5)
    assert table.tolist() == [25, 26, 27, 0, 0]  # unused entries: the scratch page
    with pytest.raises(OutOfPages):
        alloc.ensure("c", 20)  # shard 3 has 4 pages left, 5 needed
    assert alloc.pages("c") == [] and alloc.num_used == 6
    alloc.free("b")
    assert alloc.ensure("c", 20) == [25, 26, 27, 28, 29]
    alloc.free("a")
    alloc.free("c")
    assert alloc.all_free_or_cached() and alloc.num_usable == 28
    with pytest.raises(ValueError, match="multiple of 3"):
        PartitionedAllocator(32, page_size=4, shards=3)


def test_a_striped_pool_puts_page_j_of_every_sequence_in_shard_j_mod_n():
    """Context-parallel: 3 shards of 4 pages (ids 0-3, 4-7, 8-11; 0, 4, 8 scratch). Entry j of
    every table is in shard j mod 3 under random growth and frees; running out in one shard
    refuses (all or nothing) although others have room; a sequence may hold every shard's
    usable pages."""
    alloc = StripedAllocator(12, page_size=2, shards=3)

    def striped(table):
        assert [p // 4 for p in table] == [j % 3 for j in range(len(table))]

    held = _random_growth(alloc, np.random.default_rng(1), 300, 4, {0, 4, 8}, striped)
    for seq in held:
        alloc.free(seq)
    assert alloc.all_free_or_cached() and alloc.pages_per_sequence == 9
    alloc = StripedAllocator(12, page_size=2, shards=3)
    assert alloc.ensure("a", 8) == [1, 5, 9, 2]  # 4 pages: shards 0, 1, 2, 0
    alloc.ensure("b", 4)  # shards 0 and 1: shard 0 is full now
    with pytest.raises(OutOfPages):
        alloc.ensure("c", 2)  # its first page must come from shard 0; 3 pages are free
    assert alloc.pages("c") == [] and alloc.num_free == 3
    with pytest.raises(ValueError, match="multiple of 5"):
        StripedAllocator(12, page_size=2, shards=5)


def test_a_striped_pool_shares_prefix_pages_and_evicts_in_the_shard_that_needs_one():
    """With the prefix cache a second prompt starts with the first one's cached pages (same
    entries, so the same shards); when a shard runs out, an idle cached page of *that* shard
    is evicted, not the least recently used one of another shard."""
    alloc = StripedAllocator(8, page_size=2, prefix_cache=True, shards=2)  # 3 usable each
    tokens = list(range(12))  # 6 full pages, entries in shards 0, 1, 0, 1, 0, 1: all full
    alloc.start("a", [], [])
    table = alloc.ensure("a", 12)
    alloc.name_full_pages("a", tokens, 12)
    hits, digests = alloc.cached_prefix(tokens)
    assert hits == table[:5]  # a prompt keeps its last token to compute
    alloc.free("a")  # idle, least recently used first: table[5] (shard 1), table[4], ...
    assert alloc.num_free == 0 and alloc.num_cached == 6 and alloc.fits(hits, 12)
    alloc.start("b", [], [])
    # Entry 0 needs shard 0: its least recently used idle page, table[4], not table[5].
    assert alloc.ensure("b", 2) == [table[4]]
    assert alloc.cache.is_idle(table[5])
    alloc.start("c", hits[:2], digests)  # shares table[0] and table[1]
    assert alloc.ensure("c", 6) == [table[0], table[1], table[2]]


def test_cache_write_read_roundtrip_and_padding_goes_to_scratch():
    pages = kv_cache.empty_pages(2, 6, 2, 3, jnp.float32)
    tables = jnp.array([[4, 2, 0], [1, 5, 3]], jnp.int32)
    pos = jnp.array([[0, 1, 2, -1], [0, 1, 2, 3]], jnp.int32)
    values = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3) + 1
    pages = kv_cache.write_layer(pages, 1, tables, pos, values)
    read = np.asarray(kv_cache.read_layer(pages, 1, tables))
    np.testing.assert_array_equal(read[0, :3], values[0, :3])
    np.testing.assert_array_equal(read[1, :4], values[1])
    assert not np.asarray(pages)[0].any(), "layer 0 untouched"
    # The padding token landed on scratch page 0 only; no sequence page holds it.
    live = np.asarray(pages)[1, 1:]
    assert not np.isin(values[0, 3], live).all()


def tiny_attention_cfg() -> Config:
    import reference

    return Config.from_hf(reference.hf_config_dict())


@pytest.mark.parametrize("form", ["cpu-kernel", "cpu-jnp", "tpu"])
def test_absorbed_attention_over_paged_cache_equals_naive(form, monkeypatch):
    """Fill a paged cache (scattered pages) with a sequence's latents, then attend from every
    position both ways: absorbed over the cache, naive over the same latents. Every absorbed
    form runs here: the CPU kernel (k2jax.kernels.attention_cpu, in the layer's call), XLA:CPU's jnp
    form (whole rows, one batch row at a time) and the one traced for TPUs (c_kv sliced,
    batched), which is plain jnp."""
    platform = form.split("-")[0]
    monkeypatch.setattr(attention, "target_platform", lambda: platform)
    if form == "cpu-jnp":
        monkeypatch.setattr(attention, "_use_cpu_kernel", lambda: False)
    else:
        assert attention._use_cpu_kernel() == (form == "cpu-kernel")
    cfg = tiny_attention_cfg()
    attn = MLAttention(cfg, jnp.float32)
    b, t, page = 2, 11, 4
    rng = jax.random.key(0)
    x = jax.random.normal(rng, (b, t, cfg.hidden_size), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    from k2jax.model.rope import rope_tables

    cos, sin = rope_tables(cfg, pos)
    params = attn.init(jax.random.key(1), x, cos, sin, pos)
    tables = jnp.array([[5, 1, 7], [2, 8, 4]], jnp.int32)
    pages = kv_cache.empty_pages(1, 9, page, cfg.cache_width, jnp.float32)
    cache = kv_cache.PagedCache(pages, tables)
    y_cached, pages = attn.apply(params, x, cos, sin, pos, cache, 0)
    y_naive, _ = attn.apply(params, x, cos, sin, pos)
    np.testing.assert_allclose(np.asarray(y_cached), np.asarray(y_naive), atol=2e-5, rtol=1e-5)

    def both(m):
        q_nope, q_pe = m._queries(m._down_projections(x)[0], cos, sin)
        latents = kv_cache.read_layer(pages, 0, tables)[:, :t]
        cached = kv_cache.read_pages(pages, 0, tables)
        return m.absorbed(q_nope, q_pe, cached, pos), m._naive(q_nope, q_pe, latents, pos)

    absorbed, naive = attn.apply(params, method=both)
    np.testing.assert_allclose(np.asarray(absorbed), np.asarray(naive), atol=2e-5, rtol=1e-5)
