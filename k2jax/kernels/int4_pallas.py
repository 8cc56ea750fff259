"""A Pallas TPU kernel for grouped INT4 matmuls: widen in VMEM, bf16 MXU matmul, f32 accumulate.

XLA:TPU fuses a bare int4->bf16 convert, and a group-scale multiply on an int4 [O, G, S] array,
into a dot, but not a gather of chosen experts or a ``ragged_dot`` (both materialize copies; see
docs/int4.md). This kernel reads each chosen expert's INT4 tiles and scales straight from HBM:

- rows (token copies, sorted by expert) come in tiles of ``tm`` rows, each tile owned by one
  expert (``tile_expert``, scalar-prefetched so the weight BlockSpec can index by it);
- the activations come row-major, ``x [R, I]``, as the caller has them: a block is
  ``(tm, tk)`` and each group's 32 columns are a static lane slice of it inside the kernel.
  (Before, x came group-major ``[G, R, S]`` so a group was a whole block; making it was a
  transpose whose 32-wide minor axis XLA:TPU pads to 128 lanes: for K2 at batch 512 on
  v5p-64 the largest op of a MoE layer, 4x the activation bytes, once per call.)
- one token (batch-1 decode) takes one-row tiles (``tm=1``): rows are viewed as ``[R, 1, I]``,
  a block being one whole row, so the rows around the kernel are the choices themselves, not
  each padded to 8 (``k2jax.model.expert_matmul.pallas_tile_rows``);
- the weight layout is input-major ``int4 [E, G, S, O]`` with scales ``bf16 [E, G, O]``
  (``Int4Weight.values_EGSO``), so a group's scale is broadcast along sublanes, which is cheap,
  instead of along lanes, which Mosaic cannot reshape;
- the output-column axis is outermost, so consecutive row tiles of the same expert keep the same
  weight block index and Pallas skips the copy: each expert tile is read once per call.
- the weights may be a whole layer stack ``[L, E, G, S, O]`` with the layer chosen by a
  scalar-prefetched index (``layer``): a custom call's operand cannot be fused, so handing it
  ``stack[layer]`` (a scan's per-layer slice, or an unrolled ``a[i]``) makes XLA copy that
  layer's local experts to a fresh buffer before every call (~0.6 GB read + written per MoE layer
  per device for K2 on v5p-64); indexing the stack inside the BlockSpec reads only the chosen
  tiles (see docs/sharding.md, "Where the decode bytes go").

Runs on CPU in interpret mode (tests), compiles for TPU ahead of time (tests/test_int4_tpu.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from k2jax.kernels.platform import interpret_params, target_override, target_platform


def _pick(n: int, prefs: tuple[int, ...]) -> int:
    for p in prefs:
        if n % p == 0 and p <= n:
            return p
    return n


# Blocks of one grid step, double-buffered by the pipeline, stay under this (v5e has 128 MiB of
# VMEM, v5p and v6e more; Mosaic's default scoped limit is lower, so the kernel asks for it).
VMEM_LIMIT_BYTES = 48 << 20
_VMEM_BLOCK_BUDGET = 20 << 20


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The kernel's grid and its input blocks: what the pipeline copies from HBM, and when.

    ``in_specs`` are (block shape, index map) for x, the int4 values and the scales; an index
    map takes the grid indices (j, i, k) and the three scalar-prefetch refs (tile_expert,
    num_tiles, layer). ``block_bytes`` gives each input block's bytes. ``count_copies`` uses
    them to count the copies a call issues.
    """

    grid: tuple[int, int, int]
    tn: int
    tk: int
    in_specs: tuple
    block_bytes: tuple[int, int, int]


def tiling(x_shape, values_shape, *, tm: int, tn: int | None = None, tk: int | None = None):
    """The grid and blocks for x [R, G * S] (``x_shape`` names it (G, R, S): its groups, rows
    and group size) against values [(L,) E, G, S, O].

    The output-column axis is outermost and the input-chunk axis innermost. At decode (8-row
    tiles) the input is cut into 1024-wide chunks; with 128-row prefill tiles it is whole
    when its blocks fit ``_VMEM_BLOCK_BUDGET``, so consecutive row tiles of one expert keep the
    same weight block index and Pallas fetches each expert's weights once per output tile
    (with chunks, every row tile re-fetched them: counted by ``count_copies``).
    """
    groups, rows, size = x_shape
    out = values_shape[-1]
    inp = groups * size
    tn = tn or _pick(out, (512, 256, 128))
    if tk is None:
        tk = _pick(inp, (1024, 512, 256))
        if tm >= 128:
            # int4 weights + bf16 scales + activations, double-buffered
            whole = 2 * (inp * tn // 2 + groups * tn * 2 + inp * tm * 2)
            if whole <= _VMEM_BLOCK_BUDGET:
                tk = inp
    # A chunk of the input axis: whole groups, and a multiple of 8 groups for the scale block.
    gk = tk // size
    last_k = inp // tk - 1
    stacked = len(values_shape) == 5
    lead = (None,) if stacked else ()

    # Past the last real tile, every block index repeats the final real step's, so Pallas
    # issues no copy for the skipped tiles.
    def live(i, nt):
        return i < nt[0]

    def x_map(j, i, k, te, nt, ly):
        return (
            jnp.where(live(i, nt), i, jnp.maximum(nt[0] - 1, 0)),
            jnp.where(live(i, nt), k, last_k),
        )

    # A shard with no rows at all keeps one output column block too, so it copies one block
    # per input in the whole call instead of one per output tile (counted: 6.5 MB per K2 layer
    # per idle device before).
    def col(j, nt):
        return jnp.where(nt[0] > 0, j, 0)

    # A stack [L, E, ...] is indexed by the prefetched layer; one layer [E, ...] ignores it.
    def w_map(j, i, k, te, nt, ly):
        ki = jnp.where(live(i, nt), k, last_k)
        return *((ly[0],) if stacked else ()), te[i], ki, 0, col(j, nt)

    def s_map(j, i, k, te, nt, ly):
        ki = jnp.where(live(i, nt), k, last_k)
        return *((ly[0],) if stacked else ()), te[i], ki, col(j, nt)

    x_block, w_block, s_block = (tm, tk), (*lead, None, gk, size, tn), (*lead, None, gk, tn)
    return Tiling(
        grid=(out // tn, rows // tm, inp // tk),
        tn=tn,
        tk=tk,
        in_specs=((x_block, x_map), (w_block, w_map), (s_block, s_map)),
        block_bytes=(gk * tm * size * 2, gk * size * tn // 2, gk * tn * 2),
    )


def count_copies(plan: Tiling, tile_expert, num_tiles: int, layer: int = 0) -> tuple[int, ...]:
    """HBM->VMEM block copies one call issues per input (x, values, scales), counted.

    The pipeline copies an input's block at the first grid step and whenever its block index
    differs from the previous step's; the grid runs in row-major order (k fastest). This
    evaluates the kernel's own index maps over the whole grid at once with the call's
    scalar-prefetch values, so it counts what the kernel's tiling does, not what it is meant
    to do.
    """
    import numpy as np

    j, i, k = (g.ravel() for g in np.meshgrid(*map(np.arange, plan.grid), indexing="ij"))
    te = jnp.asarray(tile_expert, jnp.int32)
    nt = jnp.asarray([num_tiles], jnp.int32)
    ly = jnp.asarray([layer], jnp.int32)
    counts = []
    for _, index_map in plan.in_specs:
        parts = index_map(jnp.asarray(j), jnp.asarray(i), jnp.asarray(k), te, nt, ly)
        index = np.stack([np.broadcast_to(np.asarray(p), j.shape) for p in parts], axis=1)
        counts.append(1 + int(np.any(index[1:] != index[:-1], axis=1).sum()))
    return tuple(counts)


def _kernel(tile_expert_ref, num_tiles_ref, layer_ref, x_ref, q_ref, s_ref, o_ref, acc_ref):
    """One (output tile j, row tile i, input chunk k) step; see grouped_int4_matmul."""
    del tile_expert_ref, layer_ref
    i, k = pl.program_id(1), pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    # Tiles past the last real one hold only padding rows: skip their matmul.
    @pl.when(i < num_tiles_ref[0])
    def _():
        # One MXU matmul per group of the bare widened int4 values (exact in bf16 and f32),
        # scaled after in f32: a bf16 product q * scale would round (it needs up to 12 mantissa
        # bits). The activations' dtype sets the matmul's: bf16, or f32 for exact parity runs.
        acc = acc_ref[...]
        size = q_ref.shape[1]
        for g in range(q_ref.shape[0]):
            # Group g's columns of the row-major block: a static lane slice.
            x_g = x_ref[:, g * size : (g + 1) * size]
            part = jnp.dot(x_g, q_ref[g].astype(x_ref.dtype), preferred_element_type=jnp.float32)
            acc += part * s_ref[g : g + 1, :].astype(jnp.float32)
        acc_ref[...] = acc

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def grouped_int4_matmul(
    x_RI: jax.Array,
    tile_expert: jax.Array,
    num_tiles: jax.Array,
    values_EGSO: jax.Array,
    scale_EGO: jax.Array,
    *,
    tm: int = 8,
    tn: int | None = None,
    tk: int | None = None,
    interpret: bool | None = None,
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """See ``_grouped_int4_matmul``; ``interpret=None`` compiles the kernel when the trace is
    for TPU hardware (``_compiling_for_tpu``: a TPU backend, or ahead of time for a mesh of TPU
    devices) and otherwise runs it in Pallas' TPU interpreter with
    ``k2jax.kernels.platform.interpret_params`` (out-of-bounds reads raise, races detected).

    ``values_EGSO`` / ``scale_EGO`` are one layer's experts, or with ``layer`` given a whole
    stack ``[L, E, G, S, O]`` / ``[L, E, G, O]`` of which layer ``layer`` is used (read in place:
    no per-layer copy of the stack is made)."""
    if (layer is None) != (values_EGSO.ndim == 4):
        raise ValueError(f"layer={layer!r} with values of shape {values_EGSO.shape}")
    layer_1 = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    args = (x_RI, tile_expert, num_tiles, layer_1, values_EGSO, scale_EGO)
    if interpret is None:
        interpret = False if _compiling_for_tpu() else interpret_params()
    return _grouped_int4_matmul(*args, tm=tm, tn=tn, tk=tk, interpret=interpret)


def _compiling_for_tpu() -> bool:
    """Whether this trace becomes a real TPU program: on a TPU backend, or for TPU devices
    (ahead-of-time from a CPU host: the context mesh's devices), unless the TPU target was
    chosen on purpose off TPU (``K2JAX_TARGET=tpu``), which runs the interpreter."""
    if jax.default_backend() == "tpu":
        return True
    return target_override() is None and target_platform() == "tpu"


@functools.partial(jax.jit, static_argnames=("tm", "tn", "tk", "interpret"))
def _grouped_int4_matmul(
    x_RI: jax.Array,
    tile_expert: jax.Array,
    num_tiles: jax.Array,
    layer_1: jax.Array,
    values_LEGSO: jax.Array,
    scale_LEGO: jax.Array,
    *,
    tm: int = 8,
    tn: int | None = None,
    tk: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """out[r, o] = sum_gs x[r, g S + s] * values[l, e, g, s, o] * scale[l, e, g, o], with
    e = tile_expert[r // tm] and l = layer_1[0] (both scalar-prefetched into the index maps);
    for one layer's values [E, G, S, O] / scales [E, G, O] the l index is dropped.

    x_RI: bf16 or f32 [R, I], the rows (sorted by expert, each expert's rows padded to a
    multiple of ``tm``), row-major;
    tile_expert: int32 [R / tm]; num_tiles: int32 [1], tiles from there on are skipped (their
    output is zero). Returns float32 [R, O].
    """
    rows, inp = x_RI.shape
    groups, size = values_LEGSO.shape[-3:-1]
    assert groups * size == inp and rows % tm == 0, (x_RI.shape, values_LEGSO.shape, tm)
    plan = tiling((groups, rows, size), values_LEGSO.shape, tm=tm, tn=tn, tk=tk)
    (x_block, x_map), (w_block, w_map), (s_block, s_map) = plan.in_specs
    out_block, out_map = (tm, plan.tn), lambda j, i, k, te, nt, ly: (i, j)
    out = values_LEGSO.shape[-1]
    if tm == 1:
        # One-row tiles (one token: each expert has at most one row). A block's second-minor
        # dimension must be a multiple of 8 or the whole axis, so rows are viewed as [R, 1, I]
        # and a block is one whole row (1, tk), its row axis squeezed.
        x_RI = x_RI.reshape(rows, 1, inp)
        x_block, x_map = (None, 1, x_block[1]), _one_row(x_map)
        out_block, out_map = (None, 1, plan.tn), _one_row(out_map)
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=plan.grid,
        in_specs=[
            pl.BlockSpec(x_block, x_map),
            pl.BlockSpec(w_block, w_map),
            pl.BlockSpec(s_block, s_map),
        ],
        out_specs=pl.BlockSpec(out_block, out_map),
        scratch_shapes=[pltpu.VMEM((tm, plan.tn), jnp.float32)],
    )
    out_shape = (rows, 1, out) if tm == 1 else (rows, out)
    y = pl.pallas_call(
        _kernel,
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=VMEM_LIMIT_BYTES,
        ),
        interpret=interpret,
    )(tile_expert, num_tiles, layer_1, x_RI, values_LEGSO, scale_LEGO)
    return y.reshape(rows, out)


def _one_row(index_map):
    """A (row block, column block) index map as one for a [R, 1, C] view: (row, 0, column)."""

    def mapped(*grid_and_refs):
        row, column = index_map(*grid_and_refs)
        return row, 0, column

    return mapped
