"""Context-parallel latent attention: one sequence's pages spread over a mesh axis, each shard
attending over its own pages, the partial softmaxes merged by their log-sum-exp in one
all-reduce (issue 15, item 3; the building block, not yet wired into the engine).

Layout (docs/sharding.md, "Long contexts"). The pool ``[L, P, K, W]`` is split on its page axis
over ``axis`` (``S`` shards of ``P / S`` pages). A sequence's logical page ``j`` lives in shard
``j mod S``, so every shard holds ``ceil(pages / S)`` of every sequence and reads only those:
``local_tables [B, S, J]`` gives, for shard ``s``, the shard-local ids of the sequence's logical
pages ``s, s + S, s + 2S, ...``. Entries past a sequence's length may name any local page (the
scratch page 0 by convention); the positions mask them.

Per shard and query: the running maximum ``m``, the sum ``l`` of ``exp(score - m)`` and the
unnormalized latent sum ``acc``; merged as ``M = max_s m_s``,
``out = sum_s acc_s exp(m_s - M) / sum_s l_s exp(m_s - M)``: one all-reduce of
``[B, T, heads, kv_lora + 1]`` values and one of ``[B, T, heads]`` per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


def striped_local_tables(
    logical_tables_BW: np.ndarray, lengths_B: np.ndarray, num_shards: int, pages_per_shard: int
) -> np.ndarray:
    """``[B, S, J]`` shard-local page ids from global block tables whose logical page ``j`` is a
    global id in shard ``j mod S`` (ids ``s * pages_per_shard ... (s + 1) * pages_per_shard -
    1``); ValueError naming the row and page otherwise. Pages past ``lengths_B`` (in pages) are
    not read and become local page 0."""
    tables = np.asarray(logical_tables_BW)
    b, w = tables.shape
    j = -(-w // num_shards)
    local = np.zeros((b, num_shards, j), np.int32)
    for row in range(b):
        for page in range(int(lengths_B[row])):
            shard, global_id = page % num_shards, int(tables[row, page])
            if global_id // pages_per_shard != shard:
                raise ValueError(
                    f"row {row}: logical page {page} is global page {global_id}, in shard "
                    f"{global_id // pages_per_shard}, but a striped pool keeps it in shard {shard}"
                )
            local[row, shard, page // num_shards] = global_id % pages_per_shard
    return local


def partial_attention(q_BTNW, pages_PKW, table_BJ, positions_BT, shard, num_shards, scale, latent):
    """This shard's ``(acc [B, T, N, latent], max [B, T, N], sum [B, T, N])`` in float32.

    ``q`` is ``[q_lat | q_pe]`` (W_UK folded into q_lat); rows of the pool are
    ``[c_kv | k_pe]``. A query that sees none of this shard's keys has max ``-inf`` and zeros.
    """
    cached_BJKW = pages_PKW[table_BJ].astype(jnp.float32)
    b, j, k, w = cached_BJKW.shape
    logical_J = shard + num_shards * jnp.arange(j)
    key_pos_S = (logical_J[:, None] * k + jnp.arange(k)[None, :]).reshape(j * k)
    cached_BSW = cached_BJKW.reshape(b, j * k, w)
    scores_BTNS = scale * jnp.einsum(
        "BTNW,BSW->BTNS",
        q_BTNW.astype(jnp.float32),
        cached_BSW,
        precision=jax.lax.Precision.HIGHEST,
    )
    visible_BTS = (key_pos_S[None, None, :] <= positions_BT[:, :, None]) & (
        positions_BT[:, :, None] >= 0
    )
    scores_BTNS = jnp.where(visible_BTS[:, :, None, :], scores_BTNS, -jnp.inf)
    max_BTN = jnp.max(scores_BTNS, axis=-1)
    safe_BTN = jnp.where(jnp.isfinite(max_BTN), max_BTN, 0.0)
    probs_BTNS = jnp.exp(scores_BTNS - safe_BTN[..., None])  # exp(-inf) = 0 where masked
    acc_BTNC = jnp.einsum(
        "BTNS,BSC->BTNC",
        probs_BTNS,
        cached_BSW[..., :latent],
        precision=jax.lax.Precision.HIGHEST,
    )
    return acc_BTNC, max_BTN, probs_BTNS.sum(axis=-1)


def merge_partials(acc_BTNC, max_BTN, sum_BTN, axis):
    """The attention output from every shard's partial (inside a shard_map over ``axis``);
    zeros for queries no shard has a key for (padding)."""
    top_BTN = jax.lax.pmax(max_BTN, axis)
    top_BTN = jnp.where(jnp.isfinite(top_BTN), top_BTN, 0.0)
    weight_BTN = jnp.exp(max_BTN - top_BTN)  # 0 for a shard with no visible key
    total_BTN = jax.lax.psum(sum_BTN * weight_BTN, axis)
    out_BTNC = jax.lax.psum(acc_BTNC * weight_BTN[..., None], axis)
    return out_BTNC / jnp.where(total_BTN > 0, total_BTN, 1.0)[..., None]


def context_parallel_attention(
    q_lat_BTNC,
    q_pe_BTNR,
    pages_LPKW,
    layer,
    local_tables_BSJ,
    positions_BT,
    *,
    mesh,
    axis: str,
    scale: float,
):
    """Absorbed attention of the queries over a pool striped over ``axis`` of ``mesh``: the
    latent output ``[B, T, N, kv_lora]`` (float32), replicated. The pool is split on its page
    axis, the tables on their shard axis; queries and positions are replicated."""
    latent = q_lat_BTNC.shape[-1]
    num_shards = mesh.shape[axis]
    q_BTNW = jnp.concatenate(
        [q_lat_BTNC.astype(jnp.float32), q_pe_BTNR.astype(jnp.float32)], axis=-1
    )

    def body(q, pages, layer, tables, positions):
        shard = jax.lax.axis_index(axis)
        acc, top, total = partial_attention(
            q, pages[layer], tables[:, 0], positions, shard, num_shards, scale, latent
        )
        return merge_partials(acc, top, total, axis)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(None, axis), P(), P(None, axis), P()),
        out_specs=P(),
        check_vma=False,
    )(q_BTNW, pages_LPKW, jnp.asarray(layer, jnp.int32), local_tables_BSJ, positions_BT)
