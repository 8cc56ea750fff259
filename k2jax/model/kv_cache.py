"""The paged latent KV cache on device: one pool of pages shared by every layer's block tables.

Absorbed MLA caches, per token and layer, W = C + R values: the normalized latent c_kv and the
rotated shared rope key. The pool is one array ``pages`` [L, P, S_page, W]; a sequence owns a
list of page ids (its block table row, [B, P_seq]) that is the same for every layer. Page 0 is
a scratch page that is never handed to a sequence: padding tokens write there, and unused
block-table entries point there (their positions are masked out).

Host-side bookkeeping (which pages are free, which sequence owns which) lives in
``k2jax.serving.page_allocator``; this module only reads and writes device arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SCRATCH_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """A layer-stacked page pool plus the batch's block tables.

    pages: [L, P, S_page, W] in the cache dtype; block_tables: int32 [B, P_seq].
    """

    pages: jax.Array
    block_tables: jax.Array

    @property
    def page_size(self) -> int:
        return self.pages.shape[2]


def empty_pages(num_layers: int, num_pages: int, page_size: int, width: int, dtype) -> jax.Array:
    """A zeroed pool [L, P, S_page, W]."""
    return jnp.zeros((num_layers, num_pages, page_size, width), dtype)


def write_layer(
    pages: jax.Array,
    layer: jax.Array | int,
    block_tables_BP: jax.Array,
    positions_BT: jax.Array,
    values_BTW: jax.Array,
) -> jax.Array:
    """Store each token's values at its position's page and slot in ``layer``.

    Tokens with a negative position (padding) go to the scratch page, so a live page is never
    overwritten by them. Under ``jit`` with the pool donated this is an in-place scatter.
    """
    page_size = pages.shape[2]
    valid = positions_BT >= 0
    safe_pos = jnp.where(valid, positions_BT, 0)
    page_ids = jnp.take_along_axis(block_tables_BP, safe_pos // page_size, axis=1)
    page_ids = jnp.where(valid, page_ids, SCRATCH_PAGE)
    slots = safe_pos % page_size
    return pages.at[layer, page_ids, slots].set(values_BTW.astype(pages.dtype))


def local_page_ids(tables, shard, shard_pages: int):
    """Global page ids as pool shard ``shard``'s local ids (a pool split into equal ranges of
    ``shard_pages`` over devices, each range's first page its scratch page); ids outside the
    shard, the global scratch page among them, become local 0, the shard's scratch page."""
    base = shard * shard_pages
    mine = (tables >= base) & (tables < base + shard_pages)
    return jnp.where(mine, tables - base, SCRATCH_PAGE).astype(jnp.int32)


def read_pages(pages: jax.Array, layer: jax.Array | int, block_tables_BP: jax.Array) -> jax.Array:
    """Each row's pages of ``layer`` in sequence order: [B, P_seq, S_page, W].

    Only the pages named in the block tables are read, so the cost follows the table width.
    """
    return pages[layer, block_tables_BP]


def read_layer(pages: jax.Array, layer: jax.Array | int, block_tables_BP: jax.Array) -> jax.Array:
    """The sequence-ordered cache of ``layer`` for each row: [B, P_seq * S_page, W]."""
    b, p = block_tables_BP.shape
    return read_pages(pages, layer, block_tables_BP).reshape(b, p * pages.shape[2], pages.shape[3])
