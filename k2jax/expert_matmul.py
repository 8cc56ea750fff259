"""The routed-expert matmuls: SwiGLU experts over INT4 weights, for the experts tokens chose.

This module owns how packed INT4 expert weights meet the activations. Every caller (the MoE
block, expert parallelism, benchmarks) goes through ``routed_experts``; the formulation is chosen
in one place, ``choose_impl``, from the weight layout, the backend and the number of
(token, choice) pairs. What each one reads and why it won is measured in docs/int4.md.

Two resident layouts, both 4.5 bits per weight (group size 32):

- ``QuantizedWeight`` (k2jax.quant): int32 words [E, O, I/8] + bf16 scales [E, O, G], the
  checkpoint's own packing. Used on the CPU, where ``jnp.int4`` takes a byte per element.
- ``Int4Weight``: native ``int4`` [E, G, S, O] (input-major, S = group size) + bf16 scales
  [E, G, O]. Used on TPU, which stores int4 packed. XLA fuses the widening convert and the
  group-scale multiply of this 4-D array into the dot; the Pallas kernel (k2jax.int4_pallas)
  reads its tiles directly. Build it once at load time with ``to_int4_layout`` (or
  ``runtime_layout``, which does so only where it pays).

Formulations (``impl=``):

- ``"cpu_kernel"`` (CPU default, decode and prefill): k2jax.int4_cpu's fused matvec, an XLA
  FFI custom call that decodes each chosen expert's packed rows in registers against every pair
  routed to it; three calls per layer (gate, up, down) and nothing widened in memory. 4-6x
  faster than ``words_tiled`` at decode. Needs group size 32 and the kernel built at install
  time; otherwise the CPU falls back to ``words_tiled``.
- ``"words_decode"`` (CPU, tried, lost): gather the chosen experts' words, unpack with shifts
  and multiply-sum per group over the contiguous last axis, then apply the scales per group.
- ``"words_tiled"`` (CPU fallback, decode and prefill): sort pairs by expert into row tiles of one
  expert each, then loop over the tiles widening only that tile's expert to float32 for one
  plain dot (each widened expert stays in cache; 6-13x faster than ``naive`` at decode). The
  work is bounded by the pairs (P + min(E, P) * (tile - 1) rows), never by the expert count;
  ``jax.lax.ragged_dot`` was rejected here because XLA:CPU computes it densely over every
  expert (its cost grew 16x from 16 to 256 experts at the same top-k).
- ``"pallas"`` (TPU): sort pairs by expert into row tiles, one Pallas call per projection that
  widens INT4 tiles in VMEM, bf16 MXU matmul per group, scales applied in f32. Exact.
- ``"int4_unrolled"`` (TPU fallback, no Pallas): one fused dot per (token, choice) on a
  dynamic slice of the expert stack; XLA fuses the slice, convert and scale.
- ``"naive"``: gather the chosen experts, dequantize ("scale then einsum"), einsum: the
  reference formulation; it materializes [T, K, O, I] float32 weights (slow on the CPU), and
  on TPU it is the counter-example the tests must reject.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from k2jax import int4_cpu, int4_pallas
from k2jax.quant import NIBBLES_PER_WORD, QuantizedWeight

IMPLS = ("naive", "cpu_kernel", "words_decode", "words_tiled", "int4_unrolled", "pallas")
# The jnp TPU fallback unrolls one dot per pair; past this, compile time is not worth it.
UNROLL_MAX_PAIRS = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """An INT4 weight [..., O, I] in TPU runtime layout: int4 [..., G, S, O] + bf16 [..., G, O].

    With ``layer`` set (an int32 scalar), ``values`` / ``scale`` are a whole layer stack
    [L, ...] and the weight is layer ``layer`` of it. The model passes its MoE experts this way
    so the Pallas kernel indexes the stack in place: slicing the stack first (``stack[layer]``)
    would make XLA copy the layer's local experts before every custom call. ``unstacked()``
    gives the plain per-layer weight (a dynamic slice) for the jnp formulations.
    """

    values: jax.Array
    scale: jax.Array
    layer: jax.Array | None = None

    def unstacked(self) -> Int4Weight:
        """This layer's weight without the stack (itself when ``layer`` is None)."""
        if self.layer is None:
            return self
        return Int4Weight(
            jax.lax.dynamic_index_in_dim(self.values, self.layer, keepdims=False),
            jax.lax.dynamic_index_in_dim(self.scale, self.layer, keepdims=False),
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape [..., O, I] (of one layer when ``layer`` is set)."""
        *lead, groups, size, out = self.values.shape
        if self.layer is not None:
            lead = lead[1:]
        return (*lead, out, groups * size)

    @property
    def group_size(self) -> int:
        return self.values.shape[-2]

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The dense weight [..., O, I] in ``dtype``."""
        if self.layer is not None:
            return self.unstacked().dequantize(dtype)
        w = self.values.astype(dtype) * self.scale.astype(dtype)[..., None, :]
        *lead, groups, size, out = w.shape
        return jnp.swapaxes(w.reshape(*lead, groups * size, out), -1, -2)


def to_int4_layout(w: QuantizedWeight) -> Int4Weight:
    """Convert checkpoint-packed words [..., O, I/8] + scales [..., O, G] to ``Int4Weight``.

    Bitcasting a word XOR 0x88888888 to int4 yields its eight signed values lowest nibble first,
    which is the checkpoint's column order. Run once per weight at load time (jit it with the
    target sharding so the result lands sharded; the expert axis stays leading).
    """
    *lead, out, words = w.packed.shape
    flipped = w.packed.astype(jnp.int32) ^ jnp.int32(-0x77777778)  # 0x88888888 as int32
    q = jax.lax.bitcast_convert_type(flipped, jnp.int4)  # [..., O, I/8, 8]
    groups = words * NIBBLES_PER_WORD // w.group_size
    q = q.reshape(*lead, out, groups, w.group_size)
    return Int4Weight(
        values=jnp.moveaxis(q, -3, -1),  # [..., G, S, O]
        scale=jnp.swapaxes(w.scale, -1, -2).astype(jnp.bfloat16),  # [..., G, O]
    )


def target_platform() -> str:
    """The platform the program being traced runs on: the context mesh's devices if a mesh is
    set (so ahead-of-time compilation for a TPU topology from a CPU host picks TPU forms), else
    JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()


def expert_layout_for(platform: str | None = None) -> str:
    """The resident expert layout for ``platform``: ``"int4"`` (``Int4Weight``) on TPU, which
    stores int4 packed; ``"words"`` (``QuantizedWeight``) elsewhere, where ``jnp.int4`` takes a
    byte per element and packed words are what keep 4.5 bits per weight."""
    return "int4" if (platform or target_platform()) == "tpu" else "words"


def runtime_layout(w: QuantizedWeight, backend: str | None = None) -> QuantizedWeight | Int4Weight:
    """``w`` in the resident layout ``routed_experts`` is fastest with on ``backend``."""
    return to_int4_layout(w) if expert_layout_for(backend) == "int4" else w


def choose_impl(w: QuantizedWeight | Int4Weight | jax.Array, num_pairs: int) -> str:
    """The formulation for weight layout ``w`` and ``num_pairs`` = T * K; the one backend choice."""
    if isinstance(w, Int4Weight):
        if target_platform() == "tpu":
            return "pallas"
        return "int4_unrolled" if num_pairs <= UNROLL_MAX_PAIRS else "naive"
    if isinstance(w, QuantizedWeight):
        if target_platform() == "cpu" and int4_cpu.supports(w):
            return "cpu_kernel"
        return "words_tiled"
    return "naive"


def routed_experts(
    x_TD: jax.Array,
    expert_ids_TK: jax.Array,
    weights_TK: jax.Array,
    gate_EMD: QuantizedWeight | Int4Weight | jax.Array,
    up_EMD: QuantizedWeight | Int4Weight | jax.Array,
    down_EDM: QuantizedWeight | Int4Weight | jax.Array,
    *,
    expert_offset: int | jax.Array = 0,
    impl: str | None = None,
) -> jax.Array:
    """Sum over k of weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = expert_ids[t, k].

    The weights hold experts [expert_offset, expert_offset + E) (all of them unless expert
    parallelism passes a shard); choices outside that range contribute zero. Only the chosen
    experts' weights are read. Returns [T, D] in x's dtype; accumulates in float32. ``impl``
    overrides ``choose_impl`` (see the module docstring).
    """
    num_tokens, k = expert_ids_TK.shape
    impl = impl or choose_impl(gate_EMD, num_tokens * k)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl not in ("pallas", "words_tiled", "cpu_kernel"):
        # The kernels and the tile loops index a layer stack in place; the other forms take the
        # layer's slice, which XLA fuses into their gathers.
        gate_EMD, up_EMD, down_EDM = (_unstacked(w) for w in (gate_EMD, up_EMD, down_EDM))
    num_local = num_experts(gate_EMD)
    local_TK = expert_ids_TK - expert_offset
    mine_TK = (local_TK >= 0) & (local_TK < num_local)
    weights_TK = jnp.where(mine_TK, weights_TK, 0.0).astype(jnp.float32)
    with jax.named_scope(f"routed_experts_{impl}"):
        if impl == "pallas":
            y_TD = _pallas(x_TD, local_TK, mine_TK, weights_TK, gate_EMD, up_EMD, down_EDM)
        elif impl == "cpu_kernel":
            y_TD = _cpu_kernel(x_TD, local_TK, mine_TK, weights_TK, gate_EMD, up_EMD, down_EDM)
        elif impl == "words_tiled":
            y_TD = _words_tiled(x_TD, local_TK, mine_TK, weights_TK, gate_EMD, up_EMD, down_EDM)
        else:
            local_TK = jnp.where(mine_TK, local_TK, 0)
            step = {"naive": _naive, "words_decode": _words_decode, "int4_unrolled": _unrolled}
            y_TD = step[impl](x_TD, local_TK, weights_TK, gate_EMD, up_EMD, down_EDM)
    return y_TD.astype(x_TD.dtype)


def num_experts(w) -> int:
    if isinstance(w, QuantizedWeight):
        return w.packed.shape[0 if w.layer is None else 1]
    if isinstance(w, Int4Weight):
        return w.values.shape[0 if w.layer is None else 1]
    return w.shape[0]


def _unstacked(w):
    return w.unstacked() if isinstance(w, Int4Weight | QuantizedWeight) else w


def _swiglu(g, u):
    return jax.nn.silu(g) * u


# --- naive: gather, dequantize, einsum -----------------------------------------------------------


def _dense(w, ids, dtype) -> jax.Array:
    if isinstance(w, QuantizedWeight):
        chosen = QuantizedWeight(w.packed[ids], w.scale[ids], w.group_size)
        return chosen.dequantize(jnp.float32).astype(dtype)
    if isinstance(w, Int4Weight):
        return Int4Weight(w.values[ids], w.scale[ids]).dequantize(dtype)
    return w[ids].astype(dtype)


def _naive(x_TD, ids_TK, weights_TK, gate, up, down):
    dt = x_TD.dtype
    f32 = jnp.float32
    g = jnp.einsum("TD,TKMD->TKM", x_TD, _dense(gate, ids_TK, dt), preferred_element_type=f32)
    u = jnp.einsum("TD,TKMD->TKM", x_TD, _dense(up, ids_TK, dt), preferred_element_type=f32)
    h_TKM = _swiglu(g, u).astype(dt)
    y_TKD = jnp.einsum("TKM,TKDM->TKD", h_TKM, _dense(down, ids_TK, dt), preferred_element_type=f32)
    return jnp.einsum("TKD,TK->TD", y_TKD, weights_TK)


# --- CPU: the fused INT4 kernel (k2jax/csrc/int4_matvec.cc) -------------------------------------


def _cpu_kernel(x_TD, local_TK, mine_TK, weights_TK, gate, up, down):
    """Three kernel calls; each reads only the chosen experts, packed, once per call."""
    if not all(isinstance(w, QuantizedWeight) for w in (gate, up, down)):
        raise TypeError("cpu_kernel needs QuantizedWeight experts")
    t, k = local_TK.shape
    ids_P = jnp.where(mine_TK, local_TK, -1).reshape(-1)  # -1: another shard's expert
    g_PM = int4_cpu.project(x_TD, ids_P, gate)  # a token's k pairs share its row of x
    u_PM = int4_cpu.project(x_TD, ids_P, up)
    h_PM = _swiglu(g_PM, u_PM).astype(x_TD.dtype)
    y_PD = int4_cpu.project(h_PM, ids_P, down)
    return jnp.einsum("TKD,TK->TD", y_PD.reshape(t, k, -1), weights_TK)


# --- CPU decode: gathered words, multiply-sum per group ------------------------------------------

_SHIFTS = tuple(4 * k for k in range(NIBBLES_PER_WORD))


def _words_project(x_PI: jax.Array, packed_POW: jax.Array, scale_POG: jax.Array) -> jax.Array:
    """y[p, o] = sum_i x[p, i] W_p[o, i] from packed words, in float32.

    The words are viewed as [P, O, G, S/8] (a free reshape of a parameter, not of an
    intermediate), nibbles unpacked by shifts along a new minor axis, so the convert, the multiply
    and the group sum fuse into one loop over the contiguous input axis; the scale multiplies the
    per-group partial sums, which XLA:CPU keeps fused where broadcasting it to the weights would
    not be.
    """
    p, out, words = packed_POW.shape
    groups = scale_POG.shape[-1]
    per_group = words // groups
    w_POGW = packed_POW.reshape(p, out, groups, per_group)
    shifts = jnp.asarray(_SHIFTS, jnp.int32).reshape(1, 1, 1, 1, NIBBLES_PER_WORD)
    q = ((w_POGW[..., None] >> shifts) & 0xF).astype(jnp.float32) - 8.0  # [P, O, G, S/8, 8]
    x = x_PI.astype(jnp.float32).reshape(p, 1, groups, per_group, NIBBLES_PER_WORD)
    partial_POG = jnp.sum(x * q, axis=(3, 4))
    return jnp.sum(partial_POG * scale_POG.astype(jnp.float32), axis=2)


def _words_decode(x_TD, ids_TK, weights_TK, gate, up, down):
    if not all(isinstance(w, QuantizedWeight) for w in (gate, up, down)):
        raise TypeError("words_decode needs QuantizedWeight experts")
    t, k = ids_TK.shape
    ids_P = ids_TK.reshape(-1)
    x_PD = jnp.repeat(x_TD, k, axis=0)

    def proj(x, w):
        return _words_project(x, w.packed[ids_P], w.scale[ids_P])

    h_PM = _swiglu(proj(x_PD, gate), proj(x_PD, up)).astype(x_TD.dtype)
    y_PD = proj(h_PM, down)
    return jnp.einsum("TKD,TK->TD", y_PD.reshape(t, k, -1), weights_TK)


def _sort_pairs(local_TK, mine_TK, num_local):
    """Pairs sorted by local expert (others last), their order and per-expert counts."""
    key_P = jnp.where(mine_TK, local_TK, num_local).reshape(-1)
    order_P = jnp.argsort(key_P, stable=True)
    sizes_E = jnp.bincount(key_P, length=num_local + 1)[:num_local].astype(jnp.int32)
    return order_P, sizes_E


def _dequantize_all(w) -> jax.Array:
    if isinstance(w, QuantizedWeight | Int4Weight):
        return w.dequantize(jnp.float32)
    return w.astype(jnp.float32)


# --- TPU fallback: one fused dot per pair on a dynamic slice -------------------------------------


def _int4_project(x_GS: jax.Array, w: Int4Weight, e: jax.Array, dtype) -> jax.Array:
    """x [G, S] @ expert e of w, as XLA:TPU fuses it: slice, convert and scale feed the dot."""
    q_GSO = jax.lax.dynamic_index_in_dim(w.values, e, keepdims=False)
    s_GO = jax.lax.dynamic_index_in_dim(w.scale, e, keepdims=False)
    w_GSO = q_GSO.astype(dtype) * s_GO.astype(dtype)[:, None, :]
    return jnp.einsum("GS,GSO->O", x_GS, w_GSO, preferred_element_type=jnp.float32)


def _unrolled(x_TD, ids_TK, weights_TK, gate, up, down):
    if not all(isinstance(w, Int4Weight) for w in (gate, up, down)):
        raise TypeError("int4_unrolled needs Int4Weight experts (see to_int4_layout)")
    t, k = ids_TK.shape
    dt = x_TD.dtype
    gs_d, gs_m = gate.scale.shape[-2], down.scale.shape[-2]
    rows = []
    # Unrolled, not scanned: XLA's cost analysis then sees every read, and each dynamic slice
    # fuses into its dot. A gather of the chosen experts would copy them first.
    for ti in range(t):
        x_GS = x_TD[ti].reshape(gs_d, -1)
        acc = jnp.zeros(down.values.shape[-1], jnp.float32)
        for ki in range(k):
            e = ids_TK[ti, ki]
            h_M = _swiglu(_int4_project(x_GS, gate, e, dt), _int4_project(x_GS, up, e, dt))
            y_D = _int4_project(h_M.astype(dt).reshape(gs_m, -1), down, e, dt)
            acc = acc + weights_TK[ti, ki] * y_D
        rows.append(acc)
    return jnp.stack(rows)


# --- TPU: Pallas grouped kernel ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """(token, choice) pairs sorted by local expert into row tiles of one expert each.

    Each expert's rows are padded to a multiple of ``tm``, so ``rows`` is bounded by
    P + min(E, P) * (tm - 1): the work follows the pairs, not the expert count.
    """

    tm: int
    rows: int
    order_P: jax.Array  # pair order, sorted by expert
    row_sorted: jax.Array  # row of each sorted pair (``rows`` for other shards' pairs: dropped)
    tile_expert: jax.Array  # int32 [rows // tm], the local expert of each tile
    num_tiles: jax.Array  # int32 scalar, tiles holding real rows


def _tile_pairs(local_TK, mine_TK, num_local: int, tm: int) -> _Tiles:
    num_pairs = local_TK.size
    order_P, sizes_E = _sort_pairs(local_TK, mine_TK, num_local)
    padded_E = (sizes_E + tm - 1) // tm * tm
    end_E = jnp.cumsum(padded_E)
    start_E = end_E - padded_E
    # At most min(E, P) groups are non-empty, each padded by fewer than tm rows.
    rows = -(-(num_pairs + min(num_local, num_pairs) * (tm - 1)) // tm) * tm
    key_sorted = jnp.where(mine_TK, local_TK, num_local).reshape(-1)[order_P]
    valid = key_sorted < num_local
    e_sorted = jnp.minimum(key_sorted, num_local - 1)
    first_E = jnp.cumsum(sizes_E) - sizes_E
    rank = jnp.arange(num_pairs) - first_E[e_sorted]
    row_sorted = jnp.where(valid, start_E[e_sorted] + rank, rows)
    tile_start = jnp.arange(rows // tm) * tm
    tile_expert = jnp.searchsorted(end_E, tile_start, side="right")
    # Tiles past the last real one reuse its expert, so no new weight block is fetched.
    last = jnp.searchsorted(end_E, jnp.maximum(end_E[-1] - 1, 0), side="right")
    tile_expert = jnp.minimum(tile_expert, last).astype(jnp.int32)
    num_tiles = (end_E[-1] // tm).astype(jnp.int32)
    return _Tiles(tm, rows, order_P, row_sorted, tile_expert, num_tiles)


def _run_tiled(x_TD, local_TK, mine_TK, weights_TK, gate, up, down, tm, project):
    """Scatter pairs into tiles, SwiGLU through ``project(x_RI, w, tiles)``, gather back."""
    t, k = local_TK.shape
    tiles = _tile_pairs(local_TK, mine_TK, num_experts(gate), tm)
    x_RD = jnp.zeros((tiles.rows, x_TD.shape[1]), x_TD.dtype)
    x_RD = x_RD.at[tiles.row_sorted].set(x_TD[tiles.order_P // k], mode="drop")
    h_RM = _swiglu(project(x_RD, gate, tiles), project(x_RD, up, tiles))
    y_RD = project(h_RM.astype(x_TD.dtype), down, tiles)
    y_sorted = jnp.take(y_RD, tiles.row_sorted, axis=0, mode="fill", fill_value=0)
    y_PD = jnp.zeros_like(y_sorted).at[tiles.order_P].set(y_sorted)
    return jnp.einsum("TKD,TK->TD", y_PD.reshape(t, k, -1), weights_TK)


def _pallas(x_TD, local_TK, mine_TK, weights_TK, gate, up, down, *, interpret=None):
    if not all(isinstance(w, Int4Weight) for w in (gate, up, down)):
        raise TypeError("pallas needs Int4Weight experts (see to_int4_layout)")
    # Decode: 8-row tiles (the sublane minimum); prefill: 128-row tiles to feed the MXU.
    tm = 8 if local_TK.size <= 64 else 128

    def project(x_RI, w, tiles):
        groups, size = w.values.shape[-3:-1]
        x_GRS = jnp.swapaxes(x_RI.astype(jnp.bfloat16).reshape(-1, groups, size), 0, 1)
        return int4_pallas.grouped_int4_matmul(
            x_GRS,
            tiles.tile_expert,
            tiles.num_tiles.reshape(1),
            w.values,  # a layer stack when w.layer is set: indexed in the kernel, not copied
            w.scale,
            tm=tm,
            interpret=interpret,
            layer=w.layer,
        )

    return _run_tiled(x_TD, local_TK, mine_TK, weights_TK, gate, up, down, tm, project)


# --- CPU prefill: tiles of one expert, each expert widened once per tile -------------------------


def cpu_tile_rows(num_pairs: int) -> int:
    """Rows per tile on the CPU. Widening an expert dominates at decode, so one-row tiles waste
    nothing there; from a few tokens on, 8-row tiles amortize each widened expert over more
    rows at little padding (measured in docs/int4.md: 64-row tiles were 2-3x slower)."""
    return 1 if num_pairs <= 16 else 8


def _words_tiled(x_TD, local_TK, mine_TK, weights_TK, gate, up, down):
    """Sequential loop over row tiles: widen the tile's expert to float32, one plain dot.

    Only the experts that tokens chose are widened, one at a time (a transient [O, I] float32
    copy); the resident weights stay packed. Tiles past the real ones are skipped.
    """

    def project(x_RI, w, tiles):
        tm = tiles.tm
        x_NTI = x_RI.astype(jnp.float32).reshape(-1, tm, x_RI.shape[-1])
        out = _expert_rows(w)

        def tile(i):
            def compute():
                w_OI = _dense_one(w, tiles.tile_expert[i])
                return jnp.einsum("RI,OI->RO", x_NTI[i], w_OI)

            return jax.lax.cond(
                i < tiles.num_tiles, compute, lambda: jnp.zeros((tm, out), jnp.float32)
            )

        y_NTO = jax.lax.map(tile, jnp.arange(x_NTI.shape[0]))
        return y_NTO.reshape(-1, out)

    tm = cpu_tile_rows(local_TK.size)
    return _run_tiled(x_TD, local_TK, mine_TK, weights_TK, gate, up, down, tm, project)


def _expert_rows(w) -> int:
    if isinstance(w, Int4Weight):
        return w.values.shape[-1]
    return (w.packed if isinstance(w, QuantizedWeight) else w).shape[-2]


def _dense_one(w, e) -> jax.Array:
    """Expert ``e`` of a stack as float32 [O, I]."""
    if isinstance(w, QuantizedWeight):
        # Indexing the whole stack (layer, expert) reads just this expert; see ``layer``.
        at = (e,) if w.layer is None else (w.layer, e)
        return QuantizedWeight(w.packed[at], w.scale[at], w.group_size).dequantize(jnp.float32)
    if isinstance(w, Int4Weight):
        w = w.unstacked()
        return Int4Weight(w.values[e], w.scale[e]).dequantize(jnp.float32)
    return w[e].astype(jnp.float32)


def dequantize_reference(w: QuantizedWeight | Int4Weight | jax.Array) -> jax.Array:
    """All experts' weights [E, O, I] in float32 (for tests and benchmarks)."""
    return _dequantize_all(w)


__all__ = [
    "IMPLS",
    "Int4Weight",
    "choose_impl",
    "dequantize_reference",
    "routed_experts",
    "runtime_layout",
    "to_int4_layout",
]
