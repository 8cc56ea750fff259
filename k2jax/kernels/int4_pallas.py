"""A Pallas TPU kernel for grouped INT4 matmuls: widen in VMEM, bf16 MXU matmul, f32 accumulate.

XLA:TPU fuses a bare int4->bf16 convert, and a group-scale multiply on an int4 [O, G, S] array,
into a dot, but not a gather of chosen experts or a ``ragged_dot`` (both materialize copies; see
docs/int4.md). This kernel reads each chosen expert's INT4 tiles and scales straight from HBM:

- rows (token copies, sorted by expert) come in tiles of ``tm`` rows, each tile owned by one
  expert (``tile_expert``, scalar-prefetched so the weight BlockSpec can index by it);
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

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _pick(n: int, prefs: tuple[int, ...]) -> int:
    for p in prefs:
        if n % p == 0 and p <= n:
            return p
    return n


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
        # One MXU matmul per group of the bare widened int4 values (exact in bf16), scaled after
        # in f32: a bf16 product q * scale would round (it needs up to 12 mantissa bits).
        acc = acc_ref[...]
        for g in range(q_ref.shape[0]):
            part = jnp.dot(
                x_ref[g], q_ref[g].astype(jnp.bfloat16), preferred_element_type=jnp.float32
            )
            acc += part * s_ref[g : g + 1, :].astype(jnp.float32)
        acc_ref[...] = acc

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def grouped_int4_matmul(
    x_GRS: jax.Array,
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
    """See ``_grouped_int4_matmul``; ``interpret=None`` compiles the kernel for TPU targets and
    interprets it elsewhere, decided when lowering (so ahead-of-time TPU compilation from a CPU
    host gets the real kernel).

    ``values_EGSO`` / ``scale_EGO`` are one layer's experts, or with ``layer`` given a whole
    stack ``[L, E, G, S, O]`` / ``[L, E, G, O]`` of which layer ``layer`` is used (read in place:
    no per-layer copy of the stack is made)."""
    if (layer is None) != (values_EGSO.ndim == 4):
        raise ValueError(f"layer={layer!r} with values of shape {values_EGSO.shape}")
    layer_1 = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    args = (x_GRS, tile_expert, num_tiles, layer_1, values_EGSO, scale_EGO)
    kw = dict(tm=tm, tn=tn, tk=tk)
    if interpret is not None:
        return _grouped_int4_matmul(*args, **kw, interpret=interpret)
    return jax.lax.platform_dependent(
        *args,
        tpu=functools.partial(_grouped_int4_matmul, **kw, interpret=False),
        default=functools.partial(_grouped_int4_matmul, **kw, interpret=True),
    )


@functools.partial(jax.jit, static_argnames=("tm", "tn", "tk", "interpret"))
def _grouped_int4_matmul(
    x_GRS: jax.Array,
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
    """out[r, o] = sum_gs x[g, r, s] * values[l, e, g, s, o] * scale[l, e, g, o], with
    e = tile_expert[r // tm] and l = layer_1[0] (both scalar-prefetched into the index maps);
    for one layer's values [E, G, S, O] / scales [E, G, O] the l index is dropped.

    x_GRS: bf16 [G, R, S], the rows (sorted by expert, each expert's rows padded to a multiple of
    ``tm``) with the input axis split into groups and moved first, so a group is a whole block;
    tile_expert: int32 [R / tm]; num_tiles: int32 [1], tiles from there on are skipped (their
    output is zero). Returns float32 [R, O].
    """
    groups, rows, size = x_GRS.shape
    out = values_LEGSO.shape[-1]
    inp = groups * size
    assert values_LEGSO.shape[-3:-1] == (groups, size) and rows % tm == 0, (
        x_GRS.shape,
        values_LEGSO.shape,
        tm,
    )
    tn = tn or _pick(out, (512, 256, 128))
    # A chunk of the input axis: whole groups, and a multiple of 8 groups for the scale block.
    tk = tk or _pick(inp, (1024, 512, 256))
    gk = tk // size
    grid = (out // tn, rows // tm, inp // tk)
    last_k = inp // tk - 1

    # Past the last real tile, every block index repeats the final real step's, so Pallas
    # issues no copy for the skipped tiles.
    def live(i, nt):
        return i < nt[0]

    def x_map(j, i, k, te, nt, ly):
        return (
            jnp.where(live(i, nt), k, last_k),
            jnp.where(live(i, nt), i, jnp.maximum(nt[0] - 1, 0)),
            0,
        )

    # A stack [L, E, ...] is indexed by the prefetched layer; one layer [E, ...] ignores it.
    stacked = values_LEGSO.ndim == 5
    lead = (None,) if stacked else ()

    def w_map(j, i, k, te, nt, ly):
        return *((ly[0],) if stacked else ()), te[i], jnp.where(live(i, nt), k, last_k), 0, j

    def s_map(j, i, k, te, nt, ly):
        return *((ly[0],) if stacked else ()), te[i], jnp.where(live(i, nt), k, last_k), j

    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=grid,
        in_specs=[
            pl.BlockSpec((gk, tm, size), x_map),
            pl.BlockSpec((*lead, None, gk, size, tn), w_map),
            pl.BlockSpec((*lead, None, gk, tn), s_map),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda j, i, k, te, nt, ly: (i, j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    )
    return pl.pallas_call(
        _kernel,
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct((rows, out), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret,
    )(tile_expert, num_tiles, layer_1, x_GRS, values_LEGSO, scale_LEGO)
