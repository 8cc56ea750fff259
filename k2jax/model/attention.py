"""Multi-head latent attention (MLA), in two forms that agree with the reference.

- ``naive``: keys and values up-projected per head from the latent, as the reference writes it;
  used for a full causal forward pass without a cache (``Model.logits``).
- ``absorbed`` (paged): the key up-projection W_UK is folded into the query, scores are taken
  against the cached latents directly (q_lat . c_kv + q_pe . k_pe), the weighted sum runs over
  the latents, and the value up-projection W_UV is applied afterwards. Used for chunked prefill
  and decode against the paged cache; the cache holds C + R values per token and layer. On the
  CPU it runs through k2jax's kernel (k2jax.kernels.attention_cpu), which reads the pool in place;
  without the kernel library, through XLA:CPU in jnp. On the TPU target it runs through the
  Pallas kernel (k2jax.kernels.mla_pallas: pages read in place through the block tables, online
  softmax in VMEM); ``absorbed`` (jnp over gathered pages) stays as its reference.
- On a mesh whose pool is split, each device writes and attends over its own pool shard in a
  shard_map: by rows (``dp_attention``: ``_attend_pool_shards``) or by stripes of every
  sequence (``context_parallel``: ``_attend_striped``, merged by log-sum-exp).

Both write the same normalized latent and rotated rope key, so a cache filled by either serves
the other.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.kernels import attention_cpu, cpu_library, mla_pallas
from k2jax.kernels.platform import target_platform
from k2jax.model import context_parallel, kv_cache
from k2jax.model.config import Config
from k2jax.model.layers import RMSNorm, fan_in_init, param
from k2jax.model.moe import dividing_axes, mesh_axes
from k2jax.model.rope import apply_rope

NEG_INF = -1e30


def _use_cpu_kernel() -> bool:
    """Absorbed attention through k2jax's CPU kernel (k2jax.kernels.attention_cpu): on the CPU,
    where the kernel library was built."""
    return target_platform() == "cpu" and cpu_library.available()


class MLAttention(nn.Module):
    """MLA over x [B, T, D] at integer positions [B, T] (negative = padding)."""

    cfg: Config
    dtype: jnp.dtype = jnp.bfloat16

    def setup(self) -> None:
        c = self.cfg
        n, h, r, u = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        d, q, kv = c.hidden_size, c.q_lora_rank, c.kv_lora_rank
        # The down projections' input axis has its own name: small-batch decode splits it
        # (``_down_projections``), where the other weights' ``embed`` axis stays whole.
        self.w_q_down = param(self, "w_q_down", (d, q), ("down_in", "q_lora"), self.dtype)
        self.q_norm = RMSNorm(q, c.low_rank_norm_eps, "q_lora", self.dtype)
        self.w_q_up = param(
            self, "w_q_up", (q, n, h + r), ("q_lora", "heads", "qk_head_dim"), self.dtype
        )
        self.w_kv_down = param(
            self, "w_kv_down", (d, kv + r), ("down_in", "kv_lora_rope"), self.dtype
        )
        self.kv_norm = RMSNorm(kv, c.low_rank_norm_eps, "kv_lora", self.dtype)
        # Head-major, latent last: the checkpoint's own kv_b_proj order, and the order the
        # absorbed einsums (batched over heads) read without transposing the weight each step.
        self.w_k_up = param(
            self, "w_k_up", (n, h, kv), ("heads", "head_dim", "kv_lora"), self.dtype
        )
        self.w_v_up = param(
            self, "w_v_up", (n, u, kv), ("heads", "v_head_dim", "kv_lora"), self.dtype
        )
        self.w_o = param(
            self,
            "w_o",
            (n, u, d),
            ("heads", "v_head_dim", "embed"),
            self.dtype,
            fan_in_init((0, 1)),
        )

    def _down_projections(self, x_BTD):
        """(the queries' low-rank state [B, T, Q], the latent before its norm and rope
        [B, T, W]): x through w_q_down and w_kv_down.

        Where the rules split the weights' input axis (``down_in``: small-batch decode, so a
        chip reads 1/N of the 30 MB a layer that every chip would otherwise read), each device
        multiplies its slice of x by its rows of both weights and one psum of the two float32
        partial outputs, concatenated, joins them: one collective a layer. (Left to XLA's
        partitioner, the two einsums compiled to separate all-reduces.)
        """
        mesh = jax.sharding.get_abstract_mesh()
        # The largest subset that divides D, as the params' placement takes it (rules.spec_for).
        axes = dividing_axes(mesh_axes("down_in"), x_BTD.shape[-1], mesh.shape)
        if not axes:
            return (
                jnp.einsum("BTD,DQ->BTQ", x_BTD, self.w_q_down),
                jnp.einsum("BTD,DW->BTW", x_BTD, self.w_kv_down),
            )
        q = self.w_q_down.shape[1]
        rows = _dividing(
            tuple(a for a in mesh_axes("act_batch") if a not in axes), len(x_BTD), mesh
        )

        def local(x_BTD, w_q_DQ, w_kv_DW):
            # x comes in whole and each device slices its own columns: x split in the
            # shard_map's in_specs made the partitioner split the residual stream itself, and
            # every norm and the router then took an all-reduce of their own (5 a layer).
            part = w_q_DQ.shape[0]
            x_BTD = jax.lax.dynamic_slice_in_dim(x_BTD, jax.lax.axis_index(axes) * part, part, 2)
            f32 = jnp.float32
            both_BTJ = jnp.concatenate(
                [
                    jnp.einsum("BTD,DQ->BTQ", x_BTD, w_q_DQ, preferred_element_type=f32),
                    jnp.einsum("BTD,DW->BTW", x_BTD, w_kv_DW, preferred_element_type=f32),
                ],
                axis=-1,
            )
            return jax.lax.psum(both_BTJ, axes).astype(x_BTD.dtype)

        P = jax.sharding.PartitionSpec
        both_BTJ = jax.shard_map(
            local,
            in_specs=(P(rows or None), P(axes, None), P(axes, None)),
            out_specs=P(rows or None),
            check_vma=False,
        )(x_BTD, self.w_q_down, self.w_kv_down)
        return both_BTJ[..., :q], both_BTJ[..., q:]

    def _queries(self, q_low_BTQ, cos, sin):
        c = self.cfg
        q_BTQ = self.q_norm(q_low_BTQ)
        q_BTNK = jnp.einsum("BTQ,QNK->BTNK", q_BTQ, self.w_q_up)
        q_nope_BTNH = q_BTNK[..., : c.qk_nope_head_dim]
        q_pe_BTNR = apply_rope(q_BTNK[..., c.qk_nope_head_dim :], cos, sin)
        return q_nope_BTNH, q_pe_BTNR

    def _latents(self, kv_BTW, cos, sin):
        """The values the cache stores: [normalized c_kv (C) | rotated k_pe (R)], [B, T, W]."""
        c = self.cfg
        c_kv_BTC = self.kv_norm(kv_BTW[..., : c.kv_lora_rank])
        k_pe_BTR = apply_rope(kv_BTW[..., c.kv_lora_rank :], cos, sin)
        return jnp.concatenate([c_kv_BTC, k_pe_BTR], axis=-1)

    def __call__(
        self,
        x_BTD: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        positions_BT: jax.Array,
        cache: kv_cache.PagedCache | None = None,
        layer: jax.Array | int = 0,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Returns (y [B, T, D], the updated page pool or None without a cache)."""
        x_BTD = x_BTD.astype(self.dtype)
        q_low_BTQ, kv_BTW = self._down_projections(x_BTD)
        q_nope_BTNH, q_pe_BTNR = self._queries(q_low_BTQ, cos, sin)
        latents_BTW = self._latents(kv_BTW, cos, sin)
        if cache is None:
            with jax.named_scope("mla_naive"):
                out_BTNU = self._naive(q_nope_BTNH, q_pe_BTNR, latents_BTW, positions_BT)
            return jnp.einsum("BTNU,NUD->BTD", out_BTNU, self.w_o), None
        pool_axes, striped = _pool_split(cache.pages.shape[1], x_BTD.shape[0])
        if pool_axes:
            with jax.named_scope("mla_context_parallel" if striped else "mla_partitioned_pool"):
                attend = self._attend_striped if striped else self._attend_pool_shards
                q_lat_BTNC = jnp.einsum("BTNH,NHC->BTNC", q_nope_BTNH, self.w_k_up)
                operands = (q_lat_BTNC, q_pe_BTNR, latents_BTW, positions_BT)
                operands += (cache.block_tables, cache.pages, jnp.asarray(layer, jnp.int32))
                out_lat_BTNC, pages = attend(operands, pool_axes)
            out_BTNU = jnp.einsum("BTNC,NUC->BTNU", out_lat_BTNC, self.w_v_up)
            return jnp.einsum("BTNU,NUD->BTD", out_BTNU, self.w_o), pages
        with jax.named_scope("mla_cache_write"):
            pages = kv_cache.write_layer(
                cache.pages, layer, cache.block_tables, positions_BT, latents_BTW
            )
        with jax.named_scope("mla_absorbed"):
            if _use_cpu_kernel():
                out_BTNU = self.absorbed_cpu_kernel(
                    q_nope_BTNH, q_pe_BTNR, pages, layer, cache.block_tables, positions_BT
                )
            elif target_platform() == "cpu":
                # One row at a time on the CPU: each row's gathered pages ([S, W], ~2.4 MB at
                # 1K positions in float32) stay in cache and the step's scratch stays small;
                # the whole batch's gather ([B, S, W]) is XLA:CPU's largest temporary, and
                # scratch past glibc's 32 MB mmap limit is fresh, page-faulting memory each step.
                def one_row(row):
                    table_P, q_nope_TNH, q_pe_TNR, pos_T = row
                    cached_1PKW = kv_cache.read_pages(pages, layer, table_P[None])
                    return self.absorbed(
                        q_nope_TNH[None], q_pe_TNR[None], cached_1PKW, pos_T[None]
                    )[0]

                rows = (cache.block_tables, q_nope_BTNH, q_pe_BTNR, positions_BT)
                out_BTNU = jax.lax.map(one_row, rows)
            elif target_platform() == "tpu":
                out_BTNU = self.absorbed_tpu_kernel(
                    q_nope_BTNH, q_pe_BTNR, pages, layer, cache.block_tables, positions_BT
                )
            else:
                cached_BPKW = kv_cache.read_pages(pages, layer, cache.block_tables)
                out_BTNU = self.absorbed(q_nope_BTNH, q_pe_BTNR, cached_BPKW, positions_BT)
        return jnp.einsum("BTNU,NUD->BTD", out_BTNU, self.w_o), pages

    def _naive(self, q_nope_BTNH, q_pe_BTNR, latents_BTW, positions_BT):
        c = self.cfg
        c_kv_BSC = latents_BTW[..., : c.kv_lora_rank]
        k_pe_BSR = latents_BTW[..., c.kv_lora_rank :]
        k_nope_BSNH = jnp.einsum("BSC,NHC->BSNH", c_kv_BSC, self.w_k_up)
        v_BSNU = jnp.einsum("BSC,NUC->BSNU", c_kv_BSC, self.w_v_up)
        scores_BNTS = jnp.einsum(
            "BTNH,BSNH->BNTS", q_nope_BTNH, k_nope_BSNH, preferred_element_type=jnp.float32
        ) + jnp.einsum("BTNR,BSR->BNTS", q_pe_BTNR, k_pe_BSR, preferred_element_type=jnp.float32)
        key_pos_BS = positions_BT
        probs_BNTS = self._softmax(scores_BNTS, positions_BT, key_pos_BS)
        return jnp.einsum("BNTS,BSNU->BTNU", probs_BNTS.astype(v_BSNU.dtype), v_BSNU)

    def absorbed_cpu_kernel(self, q_nope_BTNH, q_pe_BTNR, pages, layer, tables_BP, positions_BT):
        """``absorbed`` through the CPU kernel, which reads ``layer`` of the pool in place."""
        c = self.cfg
        q_lat_BTNC = jnp.einsum("BTNH,NHC->BTNC", q_nope_BTNH, self.w_k_up)
        q_BTNW = jnp.concatenate(
            [q_lat_BTNC.astype(jnp.float32), q_pe_BTNR.astype(jnp.float32)], axis=-1
        )
        out_lat_BTNC = attention_cpu.attend(
            q_BTNW,
            pages,
            layer,
            tables_BP,
            positions_BT,
            scale=c.softmax_scale,
            latent=c.kv_lora_rank,
        ).astype(q_nope_BTNH.dtype)
        return jnp.einsum("BTNC,NUC->BTNU", out_lat_BTNC, self.w_v_up)

    def absorbed_tpu_kernel(self, q_nope_BTNH, q_pe_BTNR, pages, layer, tables_BP, positions_BT):
        """``absorbed`` through the Pallas TPU kernel, which reads ``layer`` of the pool in place.

        The queries stay in the model's dtype and the kernel widens the cache to it, as
        ``absorbed`` does; its float32 latent output is rounded to that dtype before W_UV.
        """
        q_lat_BTNC = jnp.einsum("BTNH,NHC->BTNC", q_nope_BTNH, self.w_k_up)
        kernel = functools.partial(mla_pallas.paged_mla_attention, scale=self.cfg.softmax_scale)
        out_lat_BTNC = _partitioned(
            kernel,
            q_lat_BTNC,
            q_pe_BTNR,
            pages,
            jnp.asarray(layer, jnp.int32),
            tables_BP,
            positions_BT,
        ).astype(q_nope_BTNH.dtype)
        return jnp.einsum("BTNC,NUC->BTNU", out_lat_BTNC, self.w_v_up)

    def _attend_pool_shards(self, operands, pool_axes):
        """Write and attend with the pool split over ``pool_axes`` (data-parallel attention).

        ``operands``: (q_lat [B, T, N, C], q_pe, latents [B, T, W], positions, block tables,
        pool, layer). Row block s of the batch owns pages [s P / n, (s + 1) P / n) of the pool
        (the engine's ``PartitionedAllocator``), so in a shard_map over those axes each device
        writes and reads only its own pool shard, through block tables turned into local page
        ids (the scratch page maps to the shard's own first page). Heads stay split as their
        weights are, over the head axes the pool does not use. Returns the latent output
        [B, T, N, C] in the queries' dtype and the new pool.
        """
        b, _, n, _ = operands[0].shape
        heads = kernel_split(b, n, pool_axes)[1] or None
        on_tpu = target_platform() == "tpu"

        def local(q_lat_BTNC, q_pe_BTNR, latents_BTW, positions_BT, tables_BP, pages, layer):
            shard = jax.lax.axis_index(pool_axes)
            local_BP = kv_cache.local_page_ids(tables_BP, shard, pages.shape[1])
            pages = kv_cache.write_layer(pages, layer, local_BP, positions_BT, latents_BTW)
            if on_tpu:
                out = mla_pallas.paged_mla_attention(
                    q_lat_BTNC,
                    q_pe_BTNR,
                    pages,
                    layer,
                    local_BP,
                    positions_BT,
                    scale=self.cfg.softmax_scale,
                )
            else:
                cached_BPKW = kv_cache.read_pages(pages, layer, local_BP)
                out = self._latent_attention(q_lat_BTNC, q_pe_BTNR, cached_BPKW, positions_BT)
            return out.astype(q_lat_BTNC.dtype), pages

        P = jax.sharding.PartitionSpec
        q, rows, pool = P(pool_axes, None, heads, None), P(pool_axes), P(None, pool_axes)
        return jax.shard_map(
            local,
            in_specs=(q, q, rows, rows, rows, pool, P()),
            out_specs=(q, pool),
            check_vma=False,
        )(*operands)

    def _attend_striped(self, operands, stripe_axes):
        """Write and attend with every sequence striped over ``stripe_axes`` (context-parallel
        decode, ``k2jax.model.context_parallel``): each device holds and reads its own 1/N of
        every row's pages, through the Pallas kernel's log-sum-exp form on the TPU target.
        ``operands`` as ``_attend_pool_shards`` takes them. Returns the latent output
        [B, T, N, C] in the queries' dtype and the new pool."""
        attend_shard = None
        if target_platform() == "tpu":
            attend_shard = functools.partial(
                mla_pallas.paged_mla_attention, scale=self.cfg.softmax_scale, return_lse=True
            )
        out_lat_BTNC, pages = context_parallel.write_and_attend(
            *operands, axes=stripe_axes, scale=self.cfg.softmax_scale, attend_shard=attend_shard
        )
        return out_lat_BTNC.astype(operands[0].dtype), pages

    def absorbed(self, q_nope_BTNH, q_pe_BTNR, cached_BPKW, positions_BT):
        """Attention over cached pages [B, P, K, W] in sequence order (position p * K + k)."""
        # Folding W_UK into the query turns 128-wide per-head keys into one shared 512-wide key.
        q_lat_BTNC = jnp.einsum("BTNH,NHC->BTNC", q_nope_BTNH, self.w_k_up)
        out_lat_BTNC = self._latent_attention(q_lat_BTNC, q_pe_BTNR, cached_BPKW, positions_BT)
        return jnp.einsum("BTNC,NUC->BTNU", out_lat_BTNC, self.w_v_up)

    def _latent_attention(self, q_lat_BTNC, q_pe_BTNR, cached_BPKW, positions_BT):
        """softmax(q_lat . c_kv + q_pe . k_pe) . c_kv over cached pages [B, P, K, W]."""
        c = self.cfg
        b, p, k, w = cached_BPKW.shape
        cached_BPKW = cached_BPKW.astype(q_lat_BTNC.dtype)
        key_pos_BS = jnp.broadcast_to(jnp.arange(p * k), (b, p * k))
        if target_platform() == "cpu":
            out_lat_BTNC = self._latent_sum_cpu(
                q_lat_BTNC, q_pe_BTNR, cached_BPKW, positions_BT, key_pos_BS
            )
        else:
            cached_BSW = cached_BPKW.reshape(b, p * k, w)
            c_kv_BSC = cached_BSW[..., : c.kv_lora_rank]
            k_pe_BSR = cached_BSW[..., c.kv_lora_rank :]
            f32 = jnp.float32
            scores_BNTS = jnp.einsum(
                "BTNC,BSC->BNTS", q_lat_BTNC, c_kv_BSC, preferred_element_type=f32
            ) + jnp.einsum("BTNR,BSR->BNTS", q_pe_BTNR, k_pe_BSR, preferred_element_type=f32)
            probs_BNTS = self._softmax(scores_BNTS, positions_BT, key_pos_BS)
            out_lat_BTNC = jnp.einsum("BNTS,BSC->BTNC", probs_BNTS.astype(c_kv_BSC.dtype), c_kv_BSC)
        return out_lat_BTNC

    def _latent_sum_cpu(self, q_lat_BTNC, q_pe_BTNR, cached_BPKW, positions_BT, key_pos_BS):
        """softmax(q_lat . c_kv + q_pe . k_pe) . c_kv, laid out for XLA:CPU.

        With the rope query beside the latent one, one dot against whole cached rows
        [c_kv | k_pe] gives both score terms, and no slice of the cache is copied out. Both dots
        keep the gathered pages as they are: the cache is the left operand with its contracted
        axis minor, and the weighted sum contracts (page, slot) over whole rows, its k_pe
        columns dropped after. Written over flat positions with c_kv sliced (the form kept for
        TPU, where it reads fewer bytes), XLA:CPU copied and transposed the gathered cache for
        each dot, every step (~0.8 ms per layer and row at 1K positions).
        """
        b, p, k, _ = cached_BPKW.shape
        q_BTNW = jnp.concatenate([q_lat_BTNC, q_pe_BTNR.astype(q_lat_BTNC.dtype)], axis=-1)
        scores_BPKTN = jnp.einsum(
            "BPKW,BTNW->BPKTN", cached_BPKW, q_BTNW, preferred_element_type=jnp.float32
        )
        scores_BNTS = jnp.transpose(
            scores_BPKTN.reshape(b, p * k, *q_BTNW.shape[1:3]), (0, 3, 2, 1)
        )
        probs_BNTS = self._softmax(scores_BNTS, positions_BT, key_pos_BS)
        probs_BNTPK = probs_BNTS.astype(cached_BPKW.dtype).reshape(*probs_BNTS.shape[:3], p, k)
        out_BTNW = jnp.einsum("BNTPK,BPKW->BTNW", probs_BNTPK, cached_BPKW)
        return out_BTNW[..., : self.cfg.kv_lora_rank]

    def _softmax(self, scores_BNTS, query_pos_BT, key_pos_BS):
        # A key is visible when it is not padding and not after the query (causal by position).
        visible_BTS = (key_pos_BS[:, None, :] >= 0) & (
            key_pos_BS[:, None, :] <= query_pos_BT[:, :, None]
        )
        scores_BNTS = jnp.where(visible_BTS[:, None], scores_BNTS * self.cfg.softmax_scale, NEG_INF)
        return jax.nn.softmax(scores_BNTS, axis=-1)


def _dividing(axes: tuple[str, ...], size: int, mesh) -> tuple[str, ...]:
    """The longest leading run of ``axes`` whose device count divides ``size``."""
    kept: tuple[str, ...] = ()
    for axis in axes:
        if size % math.prod(mesh.shape[a] for a in (*kept, axis)):
            break
        kept = (*kept, axis)
    return kept


def _pool_split(num_pages: int, batch: int) -> tuple[tuple[str, ...], bool]:
    """(the mesh axes the page pool is split over, whether it is striped): the rules'
    ``kv_stripes`` (every sequence over every shard; the axes must divide the pool) or else
    ``kv_pages`` (each batch block its own shard; they must divide the pool and the batch).
    ((), False) for a whole pool or no mesh."""
    stripes = mesh_axes("kv_stripes")
    axes = stripes or mesh_axes("kv_pages")
    if not axes:
        return (), False
    mesh = jax.sharding.get_abstract_mesh()
    ways = math.prod(mesh.shape[a] for a in axes)
    if num_pages % ways or (not stripes and batch % ways):
        what = f"its {num_pages} pages" + ("" if stripes else f" and the batch of {batch} rows")
        raise ValueError(
            f"the page pool is split over mesh axes {axes} ({ways} ways), which must divide " + what
        )
    return axes, bool(stripes)


def kernel_split(
    batch: int, heads: int, pool_axes: tuple[str, ...] = ()
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(row axes, head axes) the attention kernel's shard_map splits its queries over on the
    context's mesh: rows over the pool's axes when the pool is split (``_pool_split``), else as
    the batch is (``act_batch``); heads as the head weights are (``heads``), over the axes the
    rows do not use. Each is the longest leading run that divides. ``sharding.plan`` counts
    the kernel's reads for this split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), ()
    rows = pool_axes or _dividing(mesh_axes("act_batch"), batch, mesh)
    head_axes = tuple(a for a in mesh_axes("heads") if a not in rows)
    return rows, _dividing(head_axes, heads, mesh)


def _partitioned(kernel, q_lat_BTNC, q_pe_BTNR, pages, layer, tables_BP, positions_BT):
    """``kernel`` on the context's mesh. XLA cannot partition a Mosaic kernel, so on a mesh it
    runs in a shard_map: heads split as the head weights are (the ``heads`` rule), rows as the
    batch is (``act_batch``), the pool and the layer index whole on every device."""
    mesh = jax.sharding.get_abstract_mesh()
    args = (q_lat_BTNC, q_pe_BTNR, pages, layer, tables_BP, positions_BT)
    if mesh.empty or mesh.size == 1:
        return kernel(*args)
    rows, heads = kernel_split(q_lat_BTNC.shape[0], q_lat_BTNC.shape[2])
    P = jax.sharding.PartitionSpec
    q, r = P(rows or None, None, heads or None, None), P(rows or None)
    return jax.shard_map(kernel, in_specs=(q, q, P(), P(), r, r), out_specs=q, check_vma=False)(
        *args
    )
