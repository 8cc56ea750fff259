"""Context-parallel latent attention: each sequence's pages striped over mesh axes, each shard
writing and attending over its own pages, the partial softmaxes merged by their log-sum-exp
(issue 15, item 3; the ``context_parallel`` strategy, ``sharding.rules``).

Layout (docs/sharding.md, "Context-parallel decode"). The pool ``[L, P, K, W]`` is split on
its page axis into ``S`` shards of ``P / S`` pages; the first page of each shard is its scratch
page. A sequence's logical page ``j`` lives in shard ``j mod S`` (the engine's
``StripedAllocator``), so every shard holds ``ceil(pages / S)`` of every sequence and reads
only those. Block tables stay global and in sequence order; on the device each shard takes
its own column of every ``S`` (``stripe_tables``) and turns the global ids into local ones.

Inside a shard, local page ``i`` of a row is logical page ``s + S i``, so the shard's keys in
local order are still in sequence order, and "key position <= query position" becomes "local
key index <= a local position" (``stripe_positions``): the paged kernels run unchanged on a
shard, over a local block table, at local positions. Each returns its normalized output and
log-sum-exp per query and head; ``merge_partials`` combines them with one all-max and one
all-reduce of ``[B, T, heads, kv_lora + 1]`` floats per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from k2jax.model import kv_cache

NEG_INF = -1e30


def stripe_tables(tables_BW, shard, num_shards: int, shard_pages: int):
    """Shard ``shard``'s local page ids of every row's logical pages ``shard, shard + S, ...``:
    int32 ``[B, ceil(W / S)]``. Entries that are not this shard's (unused: the scratch page)
    become the shard's own scratch page, local 0."""
    b, w = tables_BW.shape
    pad = -w % num_shards
    padded = jnp.pad(tables_BW, ((0, 0), (0, pad)), constant_values=kv_cache.SCRATCH_PAGE)
    column_BJ = jnp.take(padded.reshape(b, -1, num_shards), shard, axis=2)
    return kv_cache.local_page_ids(column_BJ, shard, shard_pages)


def stripe_positions(positions_BT, shard, num_shards: int, page_size: int):
    """Each query's position in shard ``shard``'s local key order: the local index of its last
    visible key there, or -1 when the shard holds none of its keys (also for padding).

    A query at position p is on logical page g = p // K. The shard's local pages before g are
    the i with s + S i < g, n = ceil((g - s) / S) of them (none when g <= s). When page g is
    the shard's own (g = s + S n) the query sees n whole pages and p % K + 1 keys of page g,
    else just the n pages.
    """
    valid = positions_BT >= 0
    pos = jnp.where(valid, positions_BT, 0)
    page, slot = pos // page_size, pos % page_size
    before = (page - shard + num_shards - 1) // num_shards  # >= 0: shard < num_shards
    local = jnp.where(page % num_shards == shard, before * page_size + slot, before * page_size - 1)
    return jnp.where(valid, local, -1).astype(jnp.int32)


def partial_attention(q_BTNW, pages_PKW, table_BJ, local_positions_BT, scale, latent):
    """One shard's ``(out [B, T, N, latent], lse [B, T, N])`` in float32, in jnp: softmax
    attention over the shard's pages at local positions (``stripe_positions``), normalized,
    and the log-sum-exp of its scaled scores (``NEG_INF`` and zeros where it sees no key).

    ``q`` is ``[q_lat | q_pe]`` (W_UK folded into q_lat); rows of the pool are
    ``[c_kv | k_pe]``. The reference for the Pallas kernel's ``return_lse`` form.
    """
    cached_BJKW = pages_PKW[table_BJ].astype(jnp.float32)
    b, j, k, w = cached_BJKW.shape
    cached_BSW = cached_BJKW.reshape(b, j * k, w)
    scores_BTNS = scale * jnp.einsum(
        "BTNW,BSW->BTNS",
        q_BTNW.astype(jnp.float32),
        cached_BSW,
        precision=jax.lax.Precision.HIGHEST,
    )
    visible_BTS = jnp.arange(j * k)[None, None, :] <= local_positions_BT[:, :, None]
    scores_BTNS = jnp.where(visible_BTS[:, :, None, :], scores_BTNS, -jnp.inf)
    max_BTN = jnp.max(scores_BTNS, axis=-1)
    seen_BTN = jnp.isfinite(max_BTN)
    safe_BTN = jnp.where(seen_BTN, max_BTN, 0.0)
    probs_BTNS = jnp.exp(scores_BTNS - safe_BTN[..., None])  # exp(-inf) = 0 where masked
    sum_BTN = probs_BTNS.sum(axis=-1)
    acc_BTNC = jnp.einsum(
        "BTNS,BSC->BTNC",
        probs_BTNS,
        cached_BSW[..., :latent],
        precision=jax.lax.Precision.HIGHEST,
    )
    out_BTNC = acc_BTNC / jnp.where(seen_BTN, sum_BTN, 1.0)[..., None]
    lse_BTN = jnp.where(seen_BTN, safe_BTN + jnp.log(jnp.where(seen_BTN, sum_BTN, 1.0)), NEG_INF)
    return out_BTNC, lse_BTN


def merge_partials(out_BTNC, lse_BTN, axes):
    """The attention output from every shard's normalized partial and log-sum-exp (inside a
    shard_map over ``axes``): ``sum_s out_s e^(lse_s - M) / sum_s e^(lse_s - M)``, M the
    largest lse. A query no shard has a key for (padding) gets zeros: every out_s is 0."""
    top_BTN = jax.lax.pmax(lse_BTN, axes)
    weight_BTN = jnp.exp(lse_BTN - top_BTN)
    both = jnp.concatenate([out_BTNC * weight_BTN[..., None], weight_BTN[..., None]], axis=-1)
    both = jax.lax.psum(both, axes)
    return both[..., :-1] / both[..., -1:]


def write_and_attend(
    q_lat_BTNC,
    q_pe_BTNR,
    latents_BTW,
    positions_BT,
    tables_BW,
    pages_LPKW,
    layer,
    *,
    axes: tuple[str, ...],
    scale: float,
    attend_shard=None,
):
    """Store the tokens' latents and attend, the pool striped over ``axes`` of the context's
    mesh: ``(out [B, T, N, C] float32, replicated; the new pool)``.

    Every shard gets the whole batch (queries, latents, positions and global tables, all
    replicated), writes the tokens whose logical page is its own (the rest go to its scratch
    page) and attends over its own pages. ``attend_shard(q_lat, q_pe, pages, layer, table_BJ,
    local_positions_BT) -> (out, lse)`` is the per-shard attention (the Pallas kernel's
    ``return_lse`` form on TPU); by default ``partial_attention`` in jnp.
    """
    latent = q_lat_BTNC.shape[-1]

    def default(q_lat, q_pe, pages, layer, table_BJ, local_BT):
        q_BTNW = jnp.concatenate([q_lat.astype(jnp.float32), q_pe.astype(jnp.float32)], axis=-1)
        return partial_attention(q_BTNW, pages[layer], table_BJ, local_BT, scale, latent)

    attend = attend_shard or default

    def body(q_BTNW, latents, positions, tables, pages, layer):
        shard = jax.lax.axis_index(axes)
        num_shards = jax.lax.axis_size(axes)
        shard_pages, page_size = pages.shape[1], pages.shape[2]
        pages = kv_cache.write_layer(
            pages, layer, kv_cache.local_page_ids(tables, shard, shard_pages), positions, latents
        )
        out, lse = attend(
            q_BTNW[..., :latent],
            q_BTNW[..., latent:],
            pages,
            layer,
            stripe_tables(tables, shard, num_shards, shard_pages),
            stripe_positions(positions, shard, num_shards, page_size),
        )
        return merge_partials(out, lse, axes), pages

    P = jax.sharding.PartitionSpec
    pool = P(None, axes)
    # One array of queries, so heads split outside are gathered in one collective, not two.
    q_BTNW = jnp.concatenate([q_lat_BTNC, q_pe_BTNR.astype(q_lat_BTNC.dtype)], axis=-1)
    return jax.shard_map(
        body,
        in_specs=(P(), P(), P(), P(), pool, P()),
        out_specs=(P(), pool),
        check_vma=False,
    )(q_BTNW, latents_BTW, positions_BT, tables_BW, pages_LPKW, jnp.asarray(layer, jnp.int32))
