"""A Pallas TPU kernel for absorbed MLA attention over the paged latent cache.

Computes, for every query (row b, token t, head n) at position ``pos[b, t]``::

    out[b, t, n] = sum_s softmax_s(scale * (q_lat[b, t, n] . c_kv_s + q_pe[b, t, n] . k_pe_s))
                   * c_kv_s          over key positions 0 <= s <= pos[b, t]

where row s of sequence b is slot ``s % K`` of page ``block_tables[b, s // K]`` in layer
``layer`` of the pool ``pages`` [L, P, K, W] (W = C + R: the latent c_kv, then the rotated rope
key). The output stays in the latent space [B, T, N, C] (float32): the caller applies W_UV.
This is what ``k2jax.model.attention.MLAttention.absorbed`` computes before its last einsum.

How it reads (see docs/mla_pallas.md):

- grid (B, T / tq, ceil(P_seq / pps)): a block of ``tq`` tokens times all N heads (one
  [tq * N, C] query tile: MLA's key is shared by every head, so heads are just more rows), and
  the key axis in steps of ``pps`` pages, innermost;
- the pool is read in place: each page is its own BlockSpec input whose index map looks the page
  id up in the scalar-prefetched block table (``pps`` copies of the pool operand, one per page
  of a step, so one step covers pps * K keys yet every page is one contiguous DMA);
- steps past the query block's last visible page (``live``: from the block's highest position)
  repeat the previous block index, so the pipeline issues no copy for them and their compute is
  skipped; a block of padding only (position -1) maps to the scratch page 0 and computes
  nothing: its output is zeros;
- online softmax in float32 in VMEM (running max, sum and [tq * N, C] accumulator): no score
  tensor ever reaches HBM.

``tiling`` exposes the grid and the input BlockSpecs; ``count_copies`` evaluates those index
maps over the grid with a call's real scalar-prefetch values, as ``int4_pallas.count_copies``
does, so the bytes the kernel moves are counted, not assumed.

Runs on CPU in Pallas' TPU interpreter (tests, out-of-bounds reads raise); compiles for TPU
ahead of time (tests/test_mla_pallas.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from k2jax.kernels.int4_pallas import _compiling_for_tpu
from k2jax.kernels.platform import interpret_params

NEG_INF = -1e30
SCRATCH_PAGE = 0  # k2jax.model.kv_cache.SCRATCH_PAGE (kernels do not import the model)
# Query rows (tokens x heads) per block at prefill, and keys per grid step: big enough that a
# step's copies and matmuls outweigh its fixed cost (~0.35 us; one 64-token bf16 page is ~74 KB,
# ~30 ns of v5p HBM bandwidth), small enough for VMEM (figures in the doc). Not yet tuned on
# hardware. Each page of a step is one operand of the call: at most MAX_PPS of them.
TARGET_ROWS = 1024
TARGET_KEYS = 512
MAX_PPS = 16
VMEM_LIMIT_BYTES = 48 << 20


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The kernel's grid and its input blocks.

    ``in_specs`` are (block shape, index map) for q_lat, q_pe and then ``pps`` views of the
    pool (page i of each step); an index map takes the grid indices (b, qi, j) and the four
    scalar-prefetch refs (tables [B * P_seq], live [B * T / tq], positions [B * T_pad],
    layer [1]). ``block_bytes`` gives each input block's bytes. ``vmem_bytes`` estimates the
    VMEM a step holds: every block double-buffered (inputs and the f32 output) and padded to
    (8 or 16, 128) tiles, the softmax scratch, and three accumulator-sized temporaries of the
    update (compared with the compiler's figure in docs/mla_pallas.md).
    """

    grid: tuple[int, int, int]
    tq: int
    pps: int
    table_width: int
    in_specs: tuple
    block_bytes: tuple[int, ...]
    vmem_bytes: int


def _tile_bytes(rows: int, cols: int, dtype) -> int:
    """Bytes of a [rows, cols] VMEM buffer: 32-bit tiles are (8, 128), narrower types pack
    more rows per tile (16 for bf16, 32 for fp8)."""
    item = jnp.dtype(dtype).itemsize
    sub = 8 * max(1, 4 // item)
    return -(-rows // sub) * sub * -(-cols // 128) * 128 * item


def _choose_tq(tokens: int, heads: int) -> int:
    """Tokens per query block: all of them up to ``TARGET_ROWS`` rows, else a row count that is
    a multiple of 16 (a bf16 sublane tile) so the block is a legal TPU tile."""
    tq = max(1, min(tokens, TARGET_ROWS // heads))
    if tq >= tokens:
        return tokens
    step = 16 // math.gcd(heads, 16)
    return min(tokens, -(-tq // step) * step)


def tiling(
    batch: int,
    tokens: int,
    heads: int,
    latent: int,
    rope: int,
    table_width: int,
    page_size: int,
    *,
    q_dtype=jnp.bfloat16,
    cache_dtype=jnp.bfloat16,
    tq: int | None = None,
    pps: int | None = None,
) -> Tiling:
    """The grid and blocks for queries [B, T, N, C | R] against a table of ``table_width`` pages
    of ``page_size`` tokens; ``tq`` tokens per query block, ``pps`` pages per key step."""
    tq = tq or _choose_tq(tokens, heads)
    pps = pps or min(MAX_PPS, max(1, TARGET_KEYS // page_size))
    pps = min(pps, table_width)
    q_blocks = -(-tokens // tq)
    rows = tq * heads
    width = latent + rope

    def q_map(b, qi, j, tbl, live, pos, ly):
        return b, qi, 0

    def page_map(i):
        # Page i of step j is table entry j * pps + i while it is visible to the block; after
        # that, this input keeps the last page it fetched (same block index: no copy). An
        # input with no visible page in the block, and every input of a padding-only block,
        # reads the block's last visible page or the scratch page.
        def index(b, qi, j, tbl, live, pos, ly):
            n = live[b * q_blocks + qi]
            jj = j * pps + i
            own_last = i + jax.lax.div(jnp.maximum(n - 1 - i, 0), pps) * pps
            fallback = jnp.where(i < n, own_last, jnp.maximum(n - 1, 0))
            jj = jnp.where(jj < n, jj, fallback)
            page = jnp.where(n > 0, tbl[b * table_width + jj], SCRATCH_PAGE)
            return ly[0], page, 0, 0

        return index

    q_item = jnp.dtype(q_dtype).itemsize
    c_item = jnp.dtype(cache_dtype).itemsize
    f32 = jnp.float32
    blocks = (
        _tile_bytes(rows, latent, q_dtype)
        + _tile_bytes(rows, rope, q_dtype)
        + pps * _tile_bytes(page_size, width, cache_dtype)
        + _tile_bytes(rows, latent, f32)
    )
    scratch = 2 * _tile_bytes(rows, 1, f32) + _tile_bytes(rows, latent, f32)
    # What the update holds besides its buffers (the compiler fuses the rest): one
    # accumulator-sized value, two score-sized ones and the step's pages side by side; an upper
    # bound on the compiler's figures for K2's shapes (docs/mla_pallas.md).
    temporaries = (
        _tile_bytes(rows, latent, f32)
        + 2 * _tile_bytes(rows, pps * page_size, f32)
        + _tile_bytes(pps * page_size, width, q_dtype)
    )
    return Tiling(
        grid=(batch, q_blocks, -(-table_width // pps)),
        tq=tq,
        pps=pps,
        table_width=table_width,
        in_specs=(
            ((None, rows, latent), q_map),
            ((None, rows, rope), q_map),
            *(((None, None, page_size, width), page_map(i)) for i in range(pps)),
        ),
        block_bytes=(
            rows * latent * q_item,
            rows * rope * q_item,
            *(page_size * width * c_item for _ in range(pps)),
        ),
        vmem_bytes=2 * blocks + scratch + temporaries,
    )


def live_pages(positions_BT: jax.Array, tq: int, page_size: int, table_width: int) -> jax.Array:
    """Pages each query block needs, int32 [B, T / tq]: up to its highest position's page
    (0 for a block of padding only). ``positions_BT`` must be padded to a multiple of tq."""
    b, t = positions_BT.shape
    top = positions_BT.reshape(b, t // tq, tq).max(axis=-1)
    return jnp.where(top >= 0, jnp.minimum(top // page_size + 1, table_width), 0).astype(jnp.int32)


def _pad_tokens(positions_BT, tq):
    pad = -positions_BT.shape[1] % tq
    return jnp.pad(positions_BT, ((0, 0), (0, pad)), constant_values=-1)


def count_copies(
    plan: Tiling, block_tables_BP, positions_BT, page_size: int, layer: int = 0
) -> tuple[int, ...]:
    """HBM->VMEM block copies one call issues per input (q_lat, q_pe, then each pool view).

    The pipeline copies an input's block at the first grid step and whenever its block index
    differs from the previous step's; the grid runs row-major (the key-step axis fastest). This
    evaluates the kernel's own index maps over the whole grid with the call's scalar-prefetch
    values (block tables, live pages from ``positions_BT``, layer), as the kernel gets them.
    """
    tables = jnp.asarray(block_tables_BP, jnp.int32)
    positions = _pad_tokens(jnp.asarray(positions_BT, jnp.int32), plan.tq)
    live = live_pages(positions, plan.tq, page_size, plan.table_width)
    refs = (tables.reshape(-1), live.reshape(-1), positions.reshape(-1))
    ly = jnp.asarray([layer], jnp.int32)
    b, qi, j = (g.ravel() for g in np.meshgrid(*map(np.arange, plan.grid), indexing="ij"))
    grid = tuple(jnp.asarray(g) for g in (b, qi, j))
    counts = []
    for _, index_map in plan.in_specs:
        parts = index_map(*grid, *refs, ly)
        index = np.stack([np.broadcast_to(np.asarray(p), b.shape) for p in parts], axis=1)
        counts.append(1 + int(np.any(index[1:] != index[:-1], axis=1).sum()))
    return tuple(counts)


def counted_bytes(
    plan: Tiling, block_tables_BP, positions_BT, page_size: int, layer: int = 0
) -> dict[str, int]:
    """Bytes the call copies HBM->VMEM, counted: queries, pages, and their total."""
    copies = count_copies(plan, block_tables_BP, positions_BT, page_size, layer)
    sizes = [c * s for c, s in zip(copies, plan.block_bytes, strict=True)]
    return {"queries": sum(sizes[:2]), "pages": sum(sizes[2:]), "total": sum(sizes)}


def _kernel(
    tbl_ref,
    live_ref,
    pos_ref,
    ly_ref,
    ql_ref,
    qr_ref,
    *refs,
    heads: int,
    tq: int,
    pps: int,
    page_size: int,
    latent: int,
    scale: float,
    q_blocks: int,
    tokens: int,
    return_lse: bool,
):
    """One (row b, query block qi, key step j) step: pps pages into the running softmax."""
    del tbl_ref, ly_ref
    page_refs, outs = refs[:pps], refs[pps:]
    (o_ref, lse_ref), outs = (outs[:2], outs[2:]) if return_lse else ((outs[0], None), outs[1:])
    m_ref, sum_ref, acc_ref = outs
    b, qi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = live_ref[b * q_blocks + qi]
    rows = tq * heads

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full_like(m_ref, NEG_INF)
        sum_ref[...] = jnp.zeros_like(sum_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(j * pps < n)
    def _():
        # Rows are (token, head) pairs, token-major: a row's position is its token's.
        token = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0), heads)
        qpos = jnp.full((rows, 1), -1, jnp.int32)
        for t in range(tq):
            qpos = jnp.where(token == t, pos_ref[b * tokens + qi * tq + t], qpos)
        q_lat, q_pe = ql_ref[...], qr_ref[...]
        # The step's pages side by side ([pps * K, W], key order), widened to the queries'
        # dtype as the jnp form does: one score matmul and one rescale of the accumulator per
        # step, not per page.
        kv = jnp.concatenate([ref[...] for ref in page_refs], axis=0).astype(q_lat.dtype)
        c_kv, k_pe = kv[:, :latent], kv[:, latent:]
        nt = (((1,), (1,)), ((), ()))
        s = jax.lax.dot_general(q_lat, c_kv, nt, preferred_element_type=jnp.float32)
        s += jax.lax.dot_general(q_pe, k_pe, nt, preferred_element_type=jnp.float32)
        keys = pps * page_size
        key = j * keys + jax.lax.broadcasted_iota(jnp.int32, (1, keys), 1)
        visible = key <= qpos
        s = jnp.where(visible, s * scale, NEG_INF)
        m = m_ref[...]
        m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
        # Masked keys contribute exactly 0, also while a row has seen no visible key yet
        # (m_new still NEG_INF, where exp(s - m_new) would be 1).
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        denom = alpha * sum_ref[...] + p.sum(axis=-1, keepdims=True)
        acc = alpha * acc_ref[...] + jnp.dot(
            p.astype(c_kv.dtype), c_kv, preferred_element_type=jnp.float32
        )
        m_ref[...], sum_ref[...], acc_ref[...] = m_new, denom, acc

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        denom = sum_ref[...]
        # A row that saw no key (padding) has a zero sum: zeros, not 0 / 0.
        o_ref[...] = jnp.where(denom > 0, acc_ref[...] / jnp.where(denom > 0, denom, 1.0), 0.0)
        if lse_ref is not None:
            safe = jnp.where(denom > 0, denom, 1.0)
            lse_ref[...] = jnp.where(denom > 0, m_ref[...] + jnp.log(safe), NEG_INF)


def paged_mla_attention(
    q_lat_BTNC: jax.Array,
    q_pe_BTNR: jax.Array,
    pages_LPKW: jax.Array,
    layer: jax.Array | int,
    block_tables_BP: jax.Array,
    positions_BT: jax.Array,
    *,
    scale: float,
    tq: int | None = None,
    pps: int | None = None,
    interpret=None,
    vmem_limit_bytes: int = VMEM_LIMIT_BYTES,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Absorbed MLA attention of the queries over their rows' pages; see the module doc.

    q_lat_BTNC: the queries folded into the latent space (q_nope . W_UK), q_pe_BTNR: the rotated
    rope queries, both in the compute dtype (bf16, or f32 for parity runs); pages_LPKW: the
    whole pool (bf16, f32 or fp8), read in place at ``layer``; block_tables_BP: int32 page ids
    (unused entries: the scratch page 0); positions_BT: int32, negative for padding. Returns
    float32 [B, T, N, C]; padding queries get zeros. With ``return_lse`` also the log-sum-exp of
    each query's scaled scores, float32 [B, T, N] (``NEG_INF`` for a query that sees no key):
    what context-parallel decode merges shards' outputs by. ``interpret=None`` compiles the
    kernel when the trace is for TPU hardware and otherwise runs Pallas' TPU interpreter with
    ``platform.interpret_params`` (out-of-bounds reads raise).
    """
    b, t, n, c = q_lat_BTNC.shape
    r = q_pe_BTNR.shape[-1]
    if q_pe_BTNR.shape[:3] != (b, t, n):
        raise ValueError(f"q_pe {q_pe_BTNR.shape} must match q_lat {q_lat_BTNC.shape} in B, T, N")
    if pages_LPKW.ndim != 4 or pages_LPKW.shape[-1] != c + r:
        raise ValueError(
            f"pages must be [L, P, K, {c + r}] (latent + rope), got {pages_LPKW.shape}"
        )
    if block_tables_BP.ndim != 2 or block_tables_BP.shape[0] != b:
        raise ValueError(f"block tables {block_tables_BP.shape} must be [{b}, P_seq]")
    if positions_BT.shape != (b, t):
        raise ValueError(f"positions {positions_BT.shape} must be [{b}, {t}]")
    if interpret is None:
        interpret = False if _compiling_for_tpu() else interpret_params()
    layer_1 = jnp.asarray(layer, jnp.int32).reshape(1)
    return _paged_mla_attention(
        q_lat_BTNC,
        q_pe_BTNR.astype(q_lat_BTNC.dtype),
        pages_LPKW,
        layer_1,
        block_tables_BP.astype(jnp.int32),
        positions_BT.astype(jnp.int32),
        scale=float(scale),
        tq=tq,
        pps=pps,
        interpret=interpret,
        vmem_limit_bytes=vmem_limit_bytes,
        return_lse=return_lse,
    )


@functools.partial(
    jax.jit,
    static_argnames=("scale", "tq", "pps", "interpret", "vmem_limit_bytes", "return_lse"),
)
def _paged_mla_attention(
    q_lat_BTNC,
    q_pe_BTNR,
    pages_LPKW,
    layer_1,
    tables_BP,
    positions_BT,
    *,
    scale,
    tq,
    pps,
    interpret,
    vmem_limit_bytes,
    return_lse,
):
    b, t, n, c = q_lat_BTNC.shape
    r = q_pe_BTNR.shape[-1]
    page_size = pages_LPKW.shape[2]
    width = tables_BP.shape[1]
    plan = tiling(
        b,
        t,
        n,
        c,
        r,
        width,
        page_size,
        q_dtype=q_lat_BTNC.dtype,
        cache_dtype=pages_LPKW.dtype,
        tq=tq,
        pps=pps,
    )
    positions = _pad_tokens(positions_BT, plan.tq)
    t_pad = positions.shape[1]
    pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
    q_lat = jnp.pad(q_lat_BTNC, pad).reshape(b, t_pad * n, c)
    q_pe = jnp.pad(q_pe_BTNR, pad).reshape(b, t_pad * n, r)
    live = live_pages(positions, plan.tq, page_size, width)
    rows = plan.tq * n
    kernel = functools.partial(
        _kernel,
        heads=n,
        tq=plan.tq,
        pps=plan.pps,
        page_size=page_size,
        latent=c,
        scale=scale,
        q_blocks=plan.grid[1],
        tokens=t_pad,
        return_lse=return_lse,
    )
    out_specs = [pl.BlockSpec((None, rows, c), plan.in_specs[0][1])]
    out_shape = [jax.ShapeDtypeStruct((b, t_pad * n, c), jnp.float32)]
    if return_lse:
        out_specs.append(pl.BlockSpec((None, rows, 1), plan.in_specs[0][1]))
        out_shape.append(jax.ShapeDtypeStruct((b, t_pad * n, 1), jnp.float32))
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=plan.grid,
        in_specs=[pl.BlockSpec(block, index_map) for block, index_map in plan.in_specs],
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, c), jnp.float32),
        ],
    )
    outs = pl.pallas_call(
        kernel,
        grid_spec=spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=vmem_limit_bytes,
        ),
        interpret=interpret,
    )(
        tables_BP.reshape(-1),
        live.reshape(-1),
        positions.reshape(-1),
        layer_1,
        q_lat,
        q_pe,
        *([pages_LPKW] * plan.pps),
    )
    out = outs[0].reshape(b, t_pad, n, c)[:, :t]
    if not return_lse:
        return out
    return out, outs[1].reshape(b, t_pad, n)[:, :t]
