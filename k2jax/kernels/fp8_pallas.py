"""A Pallas TPU kernel for grouped FP8 matmuls: widen in VMEM, MXU matmul, block scales in f32.

The FP8 experts of DeepSeek-V3/R1 and Kimi K2 Instruct are ``float8_e4m3fn`` weights [O, I]
with one float32 scale per 128x128 block (``scale[o // 128, i // 128]``). This kernel reads a
chosen expert's FP8 tiles (1 byte per weight) and their block scales straight from HBM, with
the same row tiling as ``int4_pallas`` (rows sorted by expert, each tile owned by one expert,
``tile_expert`` scalar-prefetched into the weight BlockSpec):

- the weights stay in the checkpoint's orientation ``[E, O, I]`` (or a layer stack
  ``[L, E, O, I]`` indexed in place by a prefetched ``layer``); each 128-wide input block is one
  MXU matmul contracting the last axes of x and w (``x . w^T``), on the bare widened FP8 values
  (exact in bf16 and f32), and its [tm, 128] output sub-blocks are scaled after, in f32;
- the scales go to SMEM, read as scalars for the multiply: a block is an expert's whole scale
  grid, flattened row-major (``Fp8Weight.scale``; 4 bytes per 16384 weights, 3.5 KB for a
  2048x7168 projection), copied when the tile's expert changes;
- grid order and the "skip past the last real tile" index maps are int4_pallas's: consecutive
  row tiles of one expert keep the weight block index, so each chosen expert's tiles are
  copied once per call at decode (``count_copies`` counts it).

Shapes must be multiples of 128 (the block); ``grouped_fp8_matmul`` pads ragged toy shapes
(copying the weights: real checkpoints have none, DeepSeek's 7168 and 2048 are aligned).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from k2jax.kernels.int4_pallas import VMEM_LIMIT_BYTES, _compiling_for_tpu, _pick
from k2jax.kernels.platform import interpret_params

BLOCK = 128  # the FP8 checkpoints' 128x128 scale blocks
_VMEM_BLOCK_BUDGET = 20 << 20


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Grid and input blocks, as ``int4_pallas.Tiling``: (block shape, index map) of x, the FP8
    values and the scales; ``block_bytes`` gives each block's bytes (what one copy moves)."""

    grid: tuple[int, int, int]
    tn: int
    tk: int
    in_specs: tuple
    block_bytes: tuple[int, int, int]


def tiling(x_shape, values_shape, *, tm: int, tn: int | None = None, tk: int | None = None):
    """The grid and blocks for x [R, I] against values [(L,) E, O, I] (O, I multiples of 128).

    Output columns outermost, input chunks innermost. At decode the input is cut into chunks of
    up to 2048; with 128-row prefill tiles it is whole when the blocks fit, so a row tile of the
    same expert keeps the weight block index (copied once per output tile).
    """
    rows, inp = x_shape
    out = values_shape[-2]
    tn = tn or _pick(out, (512, 256, 128))
    if tk is None:
        tk = _pick(inp, (2048, 1024, 512, 256, 128))
        if tm >= 128:
            whole = 2 * (inp * tn + inp * tm * 2)  # fp8 weights + activations, double-buffered
            if whole <= _VMEM_BLOCK_BUDGET:
                tk = inp
    last_k = inp // tk - 1
    stacked = len(values_shape) == 4
    lead = (None,) if stacked else ()

    def live(i, nt):
        return i < nt[0]

    def x_map(j, i, k, te, nt, ly):
        return (
            jnp.where(live(i, nt), i, jnp.maximum(nt[0] - 1, 0)),
            jnp.where(live(i, nt), k, last_k),
        )

    def col(j, nt):
        return jnp.where(nt[0] > 0, j, 0)

    def w_map(j, i, k, te, nt, ly):
        ki = jnp.where(live(i, nt), k, last_k)
        return *((ly[0],) if stacked else ()), te[i], col(j, nt), ki

    # An expert's whole (flattened) scale grid is one SMEM block (a TPU block's last dims must
    # be the array's or multiples of (8, 128)); it changes with the tile's expert only.
    def s_map(j, i, k, te, nt, ly):
        return *((ly[0],) if stacked else ()), te[i], 0, 0

    x_block = (tm, tk)
    w_block = (*lead, None, tn, tk)
    s_block = (*lead, None, 1, (out // BLOCK) * (inp // BLOCK))
    return Tiling(
        grid=(out // tn, rows // tm, inp // tk),
        tn=tn,
        tk=tk,
        in_specs=((x_block, x_map), (w_block, w_map), (s_block, s_map)),
        block_bytes=(tm * tk * 2, tn * tk, (out // BLOCK) * (inp // BLOCK) * 4),
    )


def _kernel(tile_expert_ref, num_tiles_ref, layer_ref, x_ref, w_ref, s_ref, o_ref, acc_ref):
    """One (output tile j, row tile i, input chunk k) step; see grouped_fp8_matmul."""
    del tile_expert_ref, layer_ref
    j, i, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(i < num_tiles_ref[0])
    def _():
        tn, tk = w_ref.shape
        cols_of_grid = pl.num_programs(2) * (tk // BLOCK)  # ceil(I / 128)
        row0, col0 = j * (tn // BLOCK), k * (tk // BLOCK)  # this step's first scale block
        for g in range(tk // BLOCK):
            cols = slice(g * BLOCK, (g + 1) * BLOCK)
            # The bare widened FP8 values are exact in bf16 and f32; the block scale is applied
            # to the f32 partial product, so a bf16 run rounds only the activations.
            part = jax.lax.dot_general(
                x_ref[:, cols],
                w_ref[:, cols].astype(x_ref.dtype),
                (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
            for c in range(tn // BLOCK):
                outs = slice(c * BLOCK, (c + 1) * BLOCK)
                acc_ref[:, outs] += part[:, outs] * s_ref[0, (row0 + c) * cols_of_grid + col0 + g]

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def grouped_fp8_matmul(
    x_RI: jax.Array,
    tile_expert: jax.Array,
    num_tiles: jax.Array,
    values_EOI: jax.Array,
    scale_EOI: jax.Array,
    *,
    tm: int = 8,
    tn: int | None = None,
    tk: int | None = None,
    interpret=None,
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """out[r, o] = sum_i x[r, i] * values[e, o, i] * grid[e, o // 128, i // 128] in float32,
    with e = tile_expert[r // tm] (rows sorted by expert, each expert's rows padded to a
    multiple of ``tm``); tiles from ``num_tiles[0]`` on are skipped (zero output).

    ``values_EOI`` float8_e4m3fn [E, O, I] and ``scale_EOI`` float32 [E, 1, ceil(O/128) *
    ceil(I/128)] (the block grid flattened row-major, ``Fp8Weight.scale``) are one layer's
    experts, or with ``layer`` given a stack [L, E, ...] read in
    place. Ragged O or I (toy models) are zero-padded to the block here. ``interpret=None``
    compiles for TPU hardware and otherwise runs the TPU interpreter (``interpret_params``).
    Returns float32 [R, O].
    """
    if (layer is None) != (values_EOI.ndim == 3):
        raise ValueError(f"layer={layer!r} with values of shape {values_EOI.shape}")
    out, inp = values_EOI.shape[-2:]
    pad_o, pad_i = -out % BLOCK, -inp % BLOCK
    if pad_o or pad_i:
        widths = [(0, 0)] * (values_EOI.ndim - 2) + [(0, pad_o), (0, pad_i)]
        values_EOI = jnp.pad(values_EOI, widths)
        x_RI = jnp.pad(x_RI, ((0, 0), (0, pad_i)))
    layer_1 = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    if interpret is None:
        interpret = False if _compiling_for_tpu() else interpret_params()
    y = _grouped_fp8_matmul(
        x_RI,
        tile_expert,
        num_tiles,
        layer_1,
        values_EOI,
        scale_EOI.astype(jnp.float32),
        tm=tm,
        tn=tn,
        tk=tk,
        interpret=interpret,
    )
    return y[:, :out]


@functools.partial(jax.jit, static_argnames=("tm", "tn", "tk", "interpret"))
def _grouped_fp8_matmul(
    x_RI, tile_expert, num_tiles, layer_1, values, scale, *, tm, tn, tk, interpret
):
    rows, inp = x_RI.shape
    assert values.shape[-1] == inp and rows % tm == 0, (x_RI.shape, values.shape, tm)
    plan = tiling(x_RI.shape, values.shape, tm=tm, tn=tn, tk=tk)
    (x_block, x_map), (w_block, w_map), (s_block, s_map) = plan.in_specs
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=plan.grid,
        in_specs=[
            pl.BlockSpec(x_block, x_map),
            pl.BlockSpec(w_block, w_map),
            pl.BlockSpec(s_block, s_map, memory_space=pltpu.SMEM),
        ],
        out_specs=pl.BlockSpec((tm, plan.tn), lambda j, i, k, te, nt, ly: (i, j)),
        scratch_shapes=[pltpu.VMEM((tm, plan.tn), jnp.float32)],
    )
    return pl.pallas_call(
        _kernel,
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct((rows, values.shape[-2]), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=VMEM_LIMIT_BYTES,
        ),
        interpret=interpret,
    )(tile_expert, num_tiles, layer_1, x_RI, values, scale)
