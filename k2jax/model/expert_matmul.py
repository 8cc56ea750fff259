"""The routed-expert matmuls: SwiGLU experts over INT4 weights, for the experts tokens chose.

This module owns how packed INT4 expert weights meet the activations. Every caller (the MoE
block, expert parallelism, benchmarks) goes through ``routed_experts``; the formulation is chosen
in one place, ``choose_impl``, from the weight's layout (``k2jax.model.quant``: ``"words"``, the
checkpoint's packing, on the CPU; ``"int4"`` on TPU) and the target platform. What each one reads
and why it won is measured in docs/int4.md.

Formulations (``impl=``):

- ``"cpu_kernel"`` (CPU default, decode and prefill): k2jax.kernels.int4_cpu's fused matvec, an
  XLA FFI custom call that decodes each chosen expert's packed rows in registers against every
  pair routed to it; three calls per layer (gate, up, down) and nothing widened in memory. 4-6x
  faster than ``words_tiled`` at decode. Needs group size 32 and the kernel built at install
  time; otherwise the CPU falls back to ``words_tiled``.
- ``"words_tiled"`` (CPU fallback, decode and prefill; also FP8 experts on the CPU, each chosen
  expert widened by ``Fp8Weight.expert``): sort pairs by expert into row tiles of one
  expert each, then loop over the tiles widening only that tile's expert to float32 for one
  plain dot (each widened expert stays in cache; 6-13x faster than ``naive`` at decode). The
  work is bounded by the pairs (P + min(E, P) * (tile - 1) rows), never by the expert count;
  ``jax.lax.ragged_dot`` was rejected here because XLA:CPU computes it densely over every
  expert (its cost grew 16x from 16 to 256 experts at the same top-k).
- ``"pallas"`` (TPU): sort pairs by expert into row tiles, one Pallas call per projection that
  widens INT4 tiles in VMEM, bf16 MXU matmul per group, scales applied in f32. Exact. FP8
  experts (``"fp8"`` layout) take the same tiles through ``k2jax.kernels.fp8_pallas`` (FP8
  tiles widened in VMEM, 128x128 block scales applied in f32; 1 byte per weight read).
- ``"naive"``: gather the chosen experts, dequantize ("scale then einsum"), einsum: the
  reference formulation, and the form for layouts no kernel takes (int4 off TPU, dense). It
  materializes [T, K, O, I] float32 weights (slow on the CPU), and on TPU it is the
  counter-example the tests must reject.

- ``"all_experts"`` (training, the ``"float"`` layout of ``k2jax.train``'s master weights):
  every expert over every token, weighted by the routing; dense einsums, E / K times the
  chosen pairs' work, fine for the small expert counts trained here.

Two formulations that lost were removed from the package: ``words_decode`` (gathered words,
multiply-sum per group; kept as a counter-example in benchmarks/int4_matmul.py) and
``int4_unrolled`` (one fused dot per pair, the TPU fallback without Pallas, which production
never selected).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from k2jax.kernels import fp8_pallas, int4_cpu, int4_pallas
from k2jax.kernels.platform import target_platform
from k2jax.model.quant import ExpertWeight

IMPLS = ("naive", "cpu_kernel", "words_tiled", "pallas", "all_experts")


def choose_impl(w: ExpertWeight) -> str:
    """The formulation for weight ``w`` on the target platform; the one backend choice."""
    platform = target_platform()
    if w.layout == "float":
        return "all_experts"
    if w.layout in ("int4", "fp8") and platform == "tpu":
        return "pallas"
    if w.layout == "fp8":  # one chosen expert widened at a time (``Fp8Weight.expert``)
        return "words_tiled"
    if w.layout == "words":
        if platform == "cpu" and int4_cpu.supports(w.group_size):
            return "cpu_kernel"
        return "words_tiled"
    return "naive"


def routed_experts(
    x_TD: jax.Array,
    expert_ids_TK: jax.Array,
    weights_TK: jax.Array,
    gate_EMD: ExpertWeight,
    up_EMD: ExpertWeight,
    down_EDM: ExpertWeight,
    *,
    expert_offset: int | jax.Array = 0,
    num_experts_total: int | None = None,
    impl: str | None = None,
) -> jax.Array:
    """Sum over k of weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = expert_ids[t, k].

    The weights hold experts [expert_offset, expert_offset + E) (all of them unless expert
    parallelism passes a shard of ``num_experts_total``); choices outside that range contribute
    zero. Only the chosen experts' weights are read. Returns [T, D] in x's dtype; accumulates in
    float32. ``impl`` overrides ``choose_impl`` (see the module docstring).
    """
    num_tokens, k = expert_ids_TK.shape
    impl = impl or choose_impl(gate_EMD)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl not in ("pallas", "words_tiled", "cpu_kernel"):
        # The kernels and the tile loops index a layer stack in place; the other forms take the
        # layer's slice, which XLA fuses into their gathers.
        gate_EMD, up_EMD, down_EDM = (w.unstacked() for w in (gate_EMD, up_EMD, down_EDM))
    num_local = gate_EMD.num_experts
    local_TK = expert_ids_TK - expert_offset
    mine_TK = (local_TK >= 0) & (local_TK < num_local)
    weights_TK = jnp.where(mine_TK, weights_TK, 0.0).astype(jnp.float32)
    with jax.named_scope(f"routed_experts_{impl}"):
        if impl == "pallas":
            share = local_pairs(num_tokens * k, num_local, num_experts_total)
            tm = pallas_tile_rows(
                share, num_local if num_experts_total else None, num_tokens, gate_EMD.layout
            )
            capacity = pass_capacity(num_tokens * k, num_local, num_experts_total, tm)
            kernel = _pallas_fp8 if gate_EMD.layout == "fp8" else _pallas
            y_TD = kernel(
                x_TD, local_TK, mine_TK, weights_TK, gate_EMD, up_EMD, down_EDM, tm, capacity
            )
        elif impl == "cpu_kernel":
            y_TD = _cpu_kernel(x_TD, local_TK, mine_TK, weights_TK, gate_EMD, up_EMD, down_EDM)
        elif impl == "words_tiled":
            y_TD = _words_tiled(
                x_TD, local_TK, mine_TK, weights_TK, gate_EMD, up_EMD, down_EDM, num_experts_total
            )
        elif impl == "all_experts":
            y_TD = _all_experts(x_TD, local_TK, weights_TK, gate_EMD, up_EMD, down_EDM)
        else:
            local_TK = jnp.where(mine_TK, local_TK, 0)
            y_TD = _naive(x_TD, local_TK, weights_TK, gate_EMD, up_EMD, down_EDM)
    return y_TD.astype(x_TD.dtype)


def _swiglu(g, u):
    return jax.nn.silu(g) * u


# --- naive: gather, dequantize, einsum -----------------------------------------------------------


def _dense(w: ExpertWeight, ids, dtype) -> jax.Array:
    return w.take(ids).dequantize(jnp.float32).astype(dtype)


def _naive(x_TD, ids_TK, weights_TK, gate, up, down):
    dt = x_TD.dtype
    f32 = jnp.float32
    g = jnp.einsum("TD,TKMD->TKM", x_TD, _dense(gate, ids_TK, dt), preferred_element_type=f32)
    u = jnp.einsum("TD,TKMD->TKM", x_TD, _dense(up, ids_TK, dt), preferred_element_type=f32)
    h_TKM = _swiglu(g, u).astype(dt)
    y_TKD = jnp.einsum("TKM,TKDM->TKD", h_TKM, _dense(down, ids_TK, dt), preferred_element_type=f32)
    return jnp.einsum("TKD,TK->TD", y_TKD, weights_TK)


# --- training: every expert on every token, weighted by the routing ----------------------------


def _all_experts(x_TD, local_TK, weights_TK, gate, up, down):
    """Each expert over all tokens, its output weighted by the tokens' mixing weight for it
    (zero unless chosen). E / K times the work of the chosen pairs, but plain dense einsums
    that differentiate cleanly and materialize no gathered weights; what ``k2jax.train`` runs
    on its float master weights (small E). Other shards' choices fall outside one_hot: zero."""
    dt = x_TD.dtype
    f32 = jnp.float32
    num_local = gate.num_experts
    combine_TE = jnp.einsum(
        "TKE,TK->TE", jax.nn.one_hot(local_TK, num_local, dtype=f32), weights_TK
    )
    g = jnp.einsum("TD,EMD->TEM", x_TD, gate.dequantize(dt), preferred_element_type=f32)
    u = jnp.einsum("TD,EMD->TEM", x_TD, up.dequantize(dt), preferred_element_type=f32)
    h_TEM = (_swiglu(g, u) * combine_TE[..., None]).astype(dt)
    return jnp.einsum("TEM,EDM->TD", h_TEM, down.dequantize(dt), preferred_element_type=f32)


# --- CPU: the fused INT4 kernel (k2jax/kernels/csrc/int4_matvec.cc) ---------------------------


def _cpu_kernel(x_TD, local_TK, mine_TK, weights_TK, gate, up, down):
    """Three kernel calls; each reads only the chosen experts, packed, once per call."""
    _require_layout("cpu_kernel", "words", gate, up, down)
    t, k = local_TK.shape
    ids_P = jnp.where(mine_TK, local_TK, -1).reshape(-1)  # -1: another shard's expert
    g_PM = _cpu_project(x_TD, ids_P, gate)  # a token's k pairs share its row of x
    u_PM = _cpu_project(x_TD, ids_P, up)
    h_PM = _swiglu(g_PM, u_PM).astype(x_TD.dtype)
    y_PD = _cpu_project(h_PM, ids_P, down)
    return jnp.einsum("TKD,TK->TD", y_PD.reshape(t, k, -1), weights_TK)


def _cpu_project(x_RI, ids_P, w) -> jax.Array:
    return int4_cpu.project(x_RI, ids_P, w.packed, w.scale, w.group_size, layer=w.layer)


def _require_layout(impl: str, layout: str, *weights: ExpertWeight) -> None:
    if any(w.layout != layout for w in weights):
        got = sorted({w.layout for w in weights})
        raise TypeError(f"{impl} needs {layout!r}-layout experts, got {got}")


def _sorted_keys(local_TK, mine_TK, num_local):
    """(pair order sorted by local expert, the sorted keys): a pair's key is its local expert,
    or ``num_local`` for another shard's (those sort last)."""
    key_P = jnp.where(mine_TK, local_TK, num_local).reshape(-1)
    order_P = jnp.argsort(key_P, stable=True)
    return order_P, key_P[order_P]


# --- TPU: Pallas grouped kernel ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """One pass's (token, choice) pairs, sorted by local expert, in row tiles of one expert
    each.

    Each expert's rows are padded to a multiple of ``tm``, so ``rows`` is bounded by
    C + min(E, C) * (tm - 1) for a pass of C pairs: the work follows the pairs, not the expert
    count.
    """

    tm: int
    rows: int
    row_sorted: jax.Array  # row of each sorted pair (``rows`` for other shards' pairs: dropped)
    tile_expert: jax.Array  # int32 [rows // tm], the local expert of each tile
    num_tiles: jax.Array  # int32 scalar, tiles holding real rows


def _tiles_of_sorted(key_C, num_local: int, tm: int) -> _Tiles:
    """The row tiles of pairs whose keys ``key_C`` are sorted (``num_local``: not this
    shard's, last)."""
    count = key_C.shape[0]
    sizes_E = jnp.bincount(key_C, length=num_local + 1)[:num_local].astype(jnp.int32)
    padded_E = (sizes_E + tm - 1) // tm * tm
    end_E = jnp.cumsum(padded_E)
    start_E = end_E - padded_E
    # At most min(E, C) groups are non-empty, each padded by fewer than tm rows.
    rows = -(-(count + min(num_local, count) * (tm - 1)) // tm) * tm
    valid = key_C < num_local
    e_sorted = jnp.minimum(key_C, num_local - 1)
    first_E = jnp.cumsum(sizes_E) - sizes_E
    rank = jnp.arange(count) - first_E[e_sorted]
    row_sorted = jnp.where(valid, start_E[e_sorted] + rank, rows)
    tile_start = jnp.arange(rows // tm) * tm
    tile_expert = jnp.searchsorted(end_E, tile_start, side="right")
    # Tiles past the last real one reuse its expert, so no new weight block is fetched. With no
    # pair on this shard at all, every tile names expert 0: an index must stay inside the
    # stack even for tiles the kernel skips, since the pipeline still fetches their blocks
    # (num_local here was an out-of-bounds DMA on a TPU; the TPU interpreter raises on it).
    last = jnp.searchsorted(end_E, jnp.maximum(end_E[-1] - 1, 0), side="right")
    last = jnp.minimum(last, num_local - 1)
    tile_expert = jnp.minimum(tile_expert, last).astype(jnp.int32)
    num_tiles = (end_E[-1] // tm).astype(jnp.int32)
    return _Tiles(tm, rows, row_sorted, tile_expert, num_tiles)


def _passes(local_TK, mine_TK, num_local: int, capacity: int):
    """The sorted pairs cut into passes of ``capacity``: (pair ids [passes * capacity], their
    keys, the number of passes with a pair of this shard). Padding entries name pair P (past
    the end: dropped) with key ``num_local``."""
    num_pairs = local_TK.size
    order_P, key_P = _sorted_keys(local_TK, mine_TK, num_local)
    pad = -num_pairs % capacity
    order = jnp.pad(order_P, (0, pad), constant_values=num_pairs)
    keys = jnp.pad(key_P, (0, pad), constant_values=num_local)
    mine = jnp.sum(key_P < num_local)
    return order, keys, (mine + capacity - 1) // capacity


def _run_tiled(x_TD, local_TK, mine_TK, weights_TK, gate, up, down, tm, project, capacity=None):
    """Scatter pairs into tiles, SwiGLU through ``project(x_RI, w, tiles)``, gather back.

    With expert parallelism a shard expects only its share of the pairs, but any number may
    route to it: the sorted pairs are taken ``capacity`` at a time (this shard's first, in
    order), in as many passes as its pairs need (a loop with that trip count; usually one),
    so the arrays are sized for a pass, not for every pair of the batch. Exact for any routing.

    Tokens reach their rows, and rows their tokens, by one-hot matmuls where the batch is
    small (``dispatch_by_matmul``), else by a gather and a scatter-add.
    """
    t, k = local_TK.shape
    num_pairs = t * k
    capacity = min(capacity or num_pairs, num_pairs)
    order, keys, needed = _passes(local_TK, mine_TK, gate.num_experts, capacity)
    weights_P = weights_TK.reshape(-1)
    f32 = jnp.float32

    def one_pass(i, y_TD):
        order_C = jax.lax.dynamic_slice_in_dim(order, i * capacity, capacity)
        tiles = _tiles_of_sorted(
            jax.lax.dynamic_slice_in_dim(keys, i * capacity, capacity), gate.num_experts, tm
        )
        # Each pair's token and mixing weight (padding entries name pair P: token t, weight 0).
        token_C = order_C // k
        w_C = jnp.take(weights_P, order_C, mode="fill", fill_value=0)
        by_matmul = dispatch_by_matmul(t, tiles.rows)
        if by_matmul:
            # Row r holds token token_R[r] (t: a padding row): one-hot [R, T] in the
            # activations' dtype, exact (each product is x or 0, summed in float32).
            token_R = jnp.full((tiles.rows,), t, jnp.int32)
            token_R = token_R.at[tiles.row_sorted].set(token_C, mode="drop")
            w_R = jnp.zeros((tiles.rows,), f32).at[tiles.row_sorted].set(w_C, mode="drop")
            onehot_RT = (token_R[:, None] == jnp.arange(t)[None, :]).astype(x_TD.dtype)
            precision = _exact_precision(x_TD.dtype)
            x_RD = jnp.dot(onehot_RT, x_TD, preferred_element_type=f32, precision=precision)
            x_RD = x_RD.astype(x_TD.dtype)
        else:
            x_CD = x_TD[jnp.minimum(token_C, t - 1)]
            x_RD = jnp.zeros((tiles.rows, x_TD.shape[1]), x_TD.dtype)
            x_RD = x_RD.at[tiles.row_sorted].set(x_CD, mode="drop")
        h_RM = _swiglu(project(x_RD, gate, tiles), project(x_RD, up, tiles))
        y_RD = project(h_RM.astype(x_TD.dtype), down, tiles)
        if by_matmul:
            # Each row's output weighted, rounded to the activations' dtype as an expert's
            # output is, and summed onto its token in float32 by the transposed one-hot.
            yw_RD = (y_RD.astype(f32) * w_R[:, None]).astype(x_TD.dtype)
            return y_TD + jnp.dot(
                onehot_RT.T, yw_RD, preferred_element_type=f32, precision=precision
            )
        y_CD = jnp.take(y_RD, tiles.row_sorted, axis=0, mode="fill", fill_value=0)
        # Each pair's weighted output onto its token (padding entries name token t: dropped).
        return y_TD.at[token_C].add(y_CD.astype(f32) * w_C[:, None], mode="drop")

    y_TD = jnp.zeros((t, x_TD.shape[1]), f32)
    if capacity == num_pairs:
        return one_pass(0, y_TD)  # one pass holds every pair: no loop
    return jax.lax.fori_loop(0, needed, one_pass, y_TD)


# Where tokens reach their rows by one-hot matmuls instead of a gather and a scatter-add: up
# to this many tokens, and a one-hot of at most this many elements. Measured by the plan (K2,
# v5p-64, dp_attention 1,16,2, batch 512: each chip's MoE sees 512 tokens in 640 rows), the
# gather of the outputs and the scatter-add onto tokens were 250 MB of XLA's bytes a MoE layer
# and the dispatch's gather and scatter 100 MB, against ~35 MB for the two matmuls, whose
# 2 x rows x tokens x 7,168 FLOPs the idle MXU takes (2 x 4.7 GFLOP a layer there). At prefill
# sizes (thousands of tokens) the one-hot's FLOPs and size grow as tokens x rows: gathers.
DISPATCH_MATMUL_MAX_TOKENS = 1024
DISPATCH_MATMUL_MAX_ELEMENTS = 1 << 23


def dispatch_by_matmul(tokens: int, rows: int) -> bool:
    """Whether ``_run_tiled`` moves ``tokens`` tokens to and from ``rows`` rows by one-hot
    matmuls (small batches) rather than by a gather and a scatter-add."""
    return tokens <= DISPATCH_MATMUL_MAX_TOKENS and tokens * rows <= DISPATCH_MATMUL_MAX_ELEMENTS


def _exact_precision(dtype):
    """A one-hot matmul is exact in bf16 with float32 accumulation; float32 operands need the
    full-precision passes on TPU (its default rounds them to bf16)."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def local_pairs(num_pairs: int, num_local: int, num_total: int | None) -> int:
    """The (token, choice) pairs one shard of ``num_local`` experts expects out of
    ``num_pairs`` under uniform routing: all of them without expert parallelism."""
    return num_pairs if not num_total else -(-num_pairs * num_local // num_total)


# Pairs one pass of the tiled path takes under expert parallelism, as a multiple of the pairs
# a shard expects under uniform routing: sized for every pair of the batch, each shard's
# dispatch and combine arrays were most of a large-batch step's bytes (K2 on v5p-64, batch 256:
# 2.5 GB of 2.6 GB a MoE layer, docs/sharding.md); at 2x the expected share one pass nearly
# always holds them, and more pairs take more passes, never a dropped token.
CAPACITY_FACTOR = 2


def pass_capacity(num_pairs: int, num_local: int, num_total: int | None, tm: int) -> int:
    """Pairs per pass (``_run_tiled``): all of them without expert parallelism, else
    ``CAPACITY_FACTOR`` times the shard's expected share in whole tiles, at most all."""
    if not num_total:
        return num_pairs
    share = local_pairs(num_pairs, num_local, num_total)
    return min(num_pairs, -(-CAPACITY_FACTOR * share // tm) * tm)


def pallas_tile_rows(
    num_pairs: int,
    num_local: int | None = None,
    num_tokens: int | None = None,
    layout: str = "int4",
) -> int:
    """Rows per tile for the pairs a shard expects: 8 (the sublane minimum) while an expert
    gets a few rows (decode), 128 to feed the MXU when it gets many (prefill). Chosen from the
    shard's share, not the global count: at batch 64 on 32 shards each expert sees ~2 rows, and
    128-row tiles made its activation blocks dominate the copies (counted, docs/int4.md).

    One token (batch-1 decode) on the INT4 kernel: one-row tiles. Its choices are distinct
    experts, so each row is its own expert's tile anyway, and 8-row tiles padded each to 8:
    K2 at batch 1 on v5p-64 carried 64 rows of [rows, 7,168] activations and float32 outputs
    through XLA for at most 8 real ones; with one-row tiles XLA's bytes a MoE layer went from
    23.3 to 18.6 MB (the plan). With one token no expert has two rows, so no tile re-reads an
    expert's weights.

    Under expert parallelism (``num_local``: the shard's experts; ``num_pairs`` their share of
    uniformly routed pairs), with more than 64 pairs but fewer than 64 rows an expert expected:
    the power of two that holds twice an expert's expected rows. Each output tile re-reads a
    row tile's activations, so 128-row tiles for K2 at batch 512 on 32 shards (~11 rows an
    expert) copied as many activation bytes as weight bytes (counted by ``pallas_reads``: 264
    of 561 MB a layer; 32-row tiles: 66 of 363 MB)."""
    if num_tokens == 1 and layout == "int4":
        return 1
    if num_pairs <= 64:
        return 8
    if num_local is None:
        return 128
    wanted = 2 * num_pairs / num_local
    return 128 if wanted >= 128 else max(8, 1 << math.ceil(math.log2(wanted)))


def pallas_reads(
    expert_ids_TK,
    *,
    expert_offset: int,
    num_local: int,
    hidden: int,
    inter: int,
    group_size=32,
    num_total: int | None = None,
    layout: str = "int4",
) -> dict[str, int]:
    """HBM bytes one device's Pallas kernels copy for one MoE layer (gate, up, down), counted:
    ``{"activations", "values", "scales", "total"}``.

    Runs the same pair sorting and passes as ``routed_experts`` on the concrete
    ``expert_ids_TK`` (the global expert chosen by each (token, choice)) for the shard holding
    experts [expert_offset, expert_offset + num_local), then counts the block copies of each
    call's pipeline with ``int4_pallas.count_copies`` (its own index maps over its grid), for
    every pass that runs.
    ``num_total`` (all experts) sets the tile height as ``routed_experts`` does. ``layout``
    ``"fp8"`` counts the FP8 kernel's copies (``fp8_pallas``; "values" are its FP8 tiles).
    """
    ids = jnp.asarray(expert_ids_TK, jnp.int32)
    local_TK = ids - expert_offset
    mine_TK = (local_TK >= 0) & (local_TK < num_local)
    share = local_pairs(ids.size, num_local, num_total)
    tm = pallas_tile_rows(share, num_local if num_total else None, ids.shape[0], layout)
    capacity = pass_capacity(ids.size, num_local, num_total, tm)
    _, keys, needed = _passes(local_TK, mine_TK, num_local, capacity)
    sums = [0, 0, 0]
    for i in range(max(int(needed), 1) if capacity == ids.size else int(needed)):
        tiles = _tiles_of_sorted(keys[i * capacity : (i + 1) * capacity], num_local, tm)
        for inp, out in ((hidden, inter), (hidden, inter), (inter, hidden)):
            if layout == "fp8":
                plan = fp8_pallas.tiling((tiles.rows, inp), (num_local, out, inp), tm=tm)
            else:
                plan = int4_pallas.tiling(
                    (inp // group_size, tiles.rows, group_size),
                    (num_local, inp // group_size, group_size, out),
                    tm=tm,
                )
            copies = int4_pallas.count_copies(plan, tiles.tile_expert, int(tiles.num_tiles))
            for n, (c, b) in enumerate(zip(copies, plan.block_bytes, strict=True)):
                sums[n] += c * b
    return {"activations": sums[0], "values": sums[1], "scales": sums[2], "total": sum(sums)}


def _pallas(
    x_TD, local_TK, mine_TK, weights_TK, gate, up, down, tm, capacity=None, *, interpret=None
):
    _require_layout("pallas", "int4", gate, up, down)

    def project(x_RI, w, tiles):
        # bf16 activations feed the MXU at full rate; a float32 model keeps float32 (exact).
        act = jnp.float32 if x_TD.dtype == jnp.float32 else jnp.bfloat16

        return int4_pallas.grouped_int4_matmul(
            x_RI.astype(act),
            tiles.tile_expert,
            tiles.num_tiles.reshape(1),
            w.values,  # a layer stack when w.layer is set: indexed in the kernel, not copied
            w.scale,
            tm=tm,
            interpret=interpret,
            layer=w.layer,
        )

    return _run_tiled(x_TD, local_TK, mine_TK, weights_TK, gate, up, down, tm, project, capacity)


def _pallas_fp8(
    x_TD, local_TK, mine_TK, weights_TK, gate, up, down, tm, capacity=None, *, interpret=None
):
    """The FP8 experts through ``fp8_pallas``: the same row tiles, 1 byte per weight read."""
    _require_layout("pallas", "fp8", gate, up, down)
    act = jnp.float32 if x_TD.dtype == jnp.float32 else jnp.bfloat16

    def project(x_RI, w, tiles):
        return fp8_pallas.grouped_fp8_matmul(
            x_RI.astype(act),
            tiles.tile_expert,
            tiles.num_tiles.reshape(1),
            w.values,  # a layer stack when w.layer is set: indexed in the kernel, not copied
            w.scale,
            tm=tm,
            interpret=interpret,
            layer=w.layer,
        )

    return _run_tiled(x_TD, local_TK, mine_TK, weights_TK, gate, up, down, tm, project, capacity)


# --- CPU prefill: tiles of one expert, each expert widened once per tile -------------------------


def cpu_tile_rows(num_pairs: int) -> int:
    """Rows per tile on the CPU. Widening an expert dominates at decode, so one-row tiles waste
    nothing there; from a few tokens on, 8-row tiles amortize each widened expert over more
    rows at little padding (measured in docs/int4.md: 64-row tiles were 2-3x slower)."""
    return 1 if num_pairs <= 16 else 8


def _words_tiled(x_TD, local_TK, mine_TK, weights_TK, gate, up, down, num_total=None):
    """Sequential loop over row tiles: widen the tile's expert to float32, one plain dot.

    Only the experts that tokens chose are widened, one at a time (a transient [O, I] float32
    copy); the resident weights stay packed. Tiles past the real ones are skipped.
    """

    def project(x_RI, w, tiles):
        tm = tiles.tm
        x_NTI = x_RI.astype(jnp.float32).reshape(-1, tm, x_RI.shape[-1])
        out = w.shape[-2]

        def tile(i):
            def compute():
                w_OI = w.expert(tiles.tile_expert[i])
                return jnp.einsum("RI,OI->RO", x_NTI[i], w_OI)

            return jax.lax.cond(
                i < tiles.num_tiles, compute, lambda: jnp.zeros((tm, out), jnp.float32)
            )

        y_NTO = jax.lax.map(tile, jnp.arange(x_NTI.shape[0]))
        return y_NTO.reshape(-1, out)

    tm = cpu_tile_rows(local_TK.size)
    capacity = pass_capacity(local_TK.size, gate.num_experts, num_total, tm)
    return _run_tiled(x_TD, local_TK, mine_TK, weights_TK, gate, up, down, tm, project, capacity)


__all__ = ["IMPLS", "choose_impl", "cpu_tile_rows", "routed_experts"]
