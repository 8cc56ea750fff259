"""TPU evidence, from the real XLA:TPU compiler run ahead of time (libtpu, no TPU needed).

One MoE layer's routed experts at decode (batch 1 and 8, K2's shapes, 384 experts sharded over a
v5p:2x2x1 slice) must read at most ``BOUND`` times the INT4 payload + scales of the experts its
choices touch on the busiest device, plus activations, and hold no widened (or copied) expert
weight. The naive "gather, scale, einsum" formulation must fail the same check.

Bytes: the compiler's ``cost_analysis`` counts every op outside Pallas kernels; a Pallas call is
counted by XLA only for its small operands, so its traffic is counted from its pipeline: the
HBM->VMEM block copies its own index maps issue over its grid for a stated routing (seeded
uniform random top-8), on the busiest device (``k2jax.model.expert_matmul.pallas_reads``). The
bound is taken on that device: its XLA bytes plus its counted kernel bytes against the INT4
payload + scales of the experts its choices touch, plus activations. The HLO check proves the
kernel reads the weight parameters themselves: no other instruction produces an array the size
of an expert weight.
"""

import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Several test processes (and colleagues) may hold libtpu at once for AOT compilation.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from k2jax.kernels import int4_pallas  # noqa: E402
from k2jax.model.expert_matmul import pallas_reads, routed_experts  # noqa: E402
from k2jax.model.quant import Int4Weight, QuantizedWeight  # noqa: E402

D, M, GS, E, K = 7168, 2048, 32, 384, 8
# Bytes per decode step on the busiest device over the INT4 payload + scales its choices touch
# (+ activations). Measured with counted kernel copies: 1.32 at batch 1 and 8 (the kernel's own
# copies are exactly the payload plus activation blocks re-read once per output tile; XLA's ops
# around it add ~20 MB per layer per device). The earlier bound, 1.25 (measured 1.10), divided
# by an assumed payload of every choice as if all were local, and assumed the kernel's reads.
BOUND = 1.35


@pytest.fixture(scope="module")
def mesh():
    # No skip: CI installs libtpu (the test extra); without it this must fail loudly.
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    return Mesh(np.asarray(devices), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))


def _weights(mesh, layout):
    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P("expert")))

    def one(o, i):
        if layout == "words":
            return QuantizedWeight(
                sds((E, o, i // 8), jnp.int32), sds((E, o, i // GS), jnp.bfloat16)
            )
        return Int4Weight(sds((E, i // GS, GS, o), jnp.int4), sds((E, i // GS, o), jnp.bfloat16))

    return one(M, D), one(M, D), one(D, M)


def _compile_decode(mesh, t, impl, layout):
    rep = NamedSharding(mesh, P())
    e_local = E // mesh.size

    def step(x, ids, wts, g, u, d):
        def local(x, ids, wts, g, u, d):
            off = jax.lax.axis_index("expert") * e_local
            y = routed_experts(x, ids, wts, g, u, d, expert_offset=off, impl=impl)
            return jax.lax.psum(y.astype(jnp.float32), "expert").astype(x.dtype)

        ex = P("expert")
        # check_vma=False: pallas_call outputs carry no varying-axes annotation yet.
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(), P(), ex, ex, ex),
            out_specs=P(),
            check_vma=False,
        )(x, ids, wts, g, u, d)

    args = (
        jax.ShapeDtypeStruct((t, D), jnp.bfloat16, sharding=rep),
        jax.ShapeDtypeStruct((t, K), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct((t, K), jnp.float32, sharding=rep),
        *_weights(mesh, layout),
    )
    return jax.jit(step).lower(*args).compile()


_SHAPE = re.compile(r"\b(s4|s8|s32|u32|bf16|f32)\[([0-9,]*)\]")


def _big_temporaries(hlo: str) -> list[str]:
    """Instructions (not parameters) whose result is at least one expert projection's weight."""
    found = []
    for line in hlo.splitlines():
        line = line.strip()
        if "=" not in line or "parameter(" in line or line.startswith(("ROOT %tuple", "%tuple")):
            continue
        if "get-tuple-element(%param" in line:  # a view of a parameter (a branch's operand)
            continue
        if line.endswith("{"):  # a computation's signature (a cond branch's), not a value
            continue
        lhs = line.split("=", 1)[1].split("(", 1)[0]
        for _, dims in _SHAPE.findall(lhs):
            shape = [int(d) for d in dims.split(",") if d]
            # An expert weight, packed, converted or widened, in any layout: at least 1/8 of
            # M*D elements, with an M-side dim and a D-side dim (activations have only one).
            m_side = {M, M // 8, M // GS} & set(shape)
            d_side = {D, D // 8, D // GS} & set(shape)
            if np.prod(shape) >= M * D // 8 and m_side and d_side:
                found.append(line[:160])
    return found


PER_EXPERT = 3 * (M * D // 2 + M * D // GS * 2)  # gate, up, down: INT4 + bf16 scales


def _routing(t: int, seed: int = 0) -> np.ndarray:
    """Uniform random top-K: each token's K distinct experts, seeded."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(E, K, replace=False) for _ in range(t)]).astype(np.int32)


def _busiest(t: int, devices: int) -> tuple[int, int]:
    """(counted kernel bytes, ideal bytes) of the device whose kernels copy the most."""
    ids = _routing(t)
    local = E // devices
    rows = []
    for d in range(devices):
        lo = d * local
        counted = pallas_reads(ids, expert_offset=lo, num_local=local, hidden=D, inter=M)
        chosen = len({e for e in ids.ravel() if lo <= e < lo + local})
        rows.append((counted["total"], chosen * PER_EXPERT))
    return max(rows)


def _check(compiled, t, impl, devices=4):
    activations = 2 * t * D * 2
    xla_bytes = compiled.cost_analysis()["bytes accessed"]
    kernel_bytes, ideal = 0, t * K * PER_EXPERT  # naive: every choice, as if all were local
    hlo = compiled.as_text()
    calls = hlo.count('custom_call_target="tpu_custom_call"')
    if impl == "pallas":
        assert calls == 3, calls  # gate, up, down
        kernel_bytes, ideal = _busiest(t, devices)
    ratio = (xla_bytes + kernel_bytes) / (ideal + activations)
    return ratio, _big_temporaries(hlo)


def test_counted_decode_reads_are_each_chosen_experts_weights_once():
    """At decode every chosen local expert's INT4 tiles and scales are copied exactly once per
    projection; the activation blocks come on top (re-read once per output tile). An idle
    shard copies one block per input and projection (the pipeline's first step)."""
    ids = _routing(8)
    local = E // 4
    for d in range(4):
        lo = d * local
        chosen = len({e for e in ids.ravel() if lo <= e < lo + local})
        counted = pallas_reads(ids, expert_offset=lo, num_local=local, hidden=D, inter=M)
        assert counted["values"] + counted["scales"] == chosen * PER_EXPERT, (d, counted)
        assert counted["activations"] < 0.1 * chosen * PER_EXPERT
    idle = pallas_reads(ids, expert_offset=10 * E, num_local=local, hidden=D, inter=M)
    assert 0 < idle["total"] < PER_EXPERT // 20


def test_prefill_reads_each_experts_weights_once_per_output_tile():
    """Many rows on few experts (128-row tiles, several per expert): the weights are copied
    once per output tile, not once per row tile. Forcing the decode's 1024-wide input chunks
    on the same routing re-reads them for every row tile: the count can tell the two apart."""
    t = 256
    ids = np.tile(np.arange(K, dtype=np.int32), (t, 1))  # every token on experts 0..7
    counted = pallas_reads(ids, expert_offset=0, num_local=E // 4, hidden=D, inter=M)
    assert counted["values"] + counted["scales"] == K * PER_EXPERT
    from k2jax.model.expert_matmul import _sorted_keys, _tiles_of_sorted

    ids_local = jax.numpy.asarray(ids)  # 256 rows on each of 8 experts: 2 row tiles each
    tiles = _tiles_of_sorted(_sorted_keys(ids_local, ids_local >= 0, E // 4)[1], E // 4, 128)
    plan = int4_pallas.tiling((D // GS, tiles.rows, GS), (E // 4, D // GS, GS, M), tm=128, tk=1024)
    _, w_copies, _ = int4_pallas.count_copies(plan, tiles.tile_expert, int(tiles.num_tiles))
    whole = int4_pallas.tiling((D // GS, tiles.rows, GS), (E // 4, D // GS, GS, M), tm=128)
    _, w_once, _ = int4_pallas.count_copies(whole, tiles.tile_expert, int(tiles.num_tiles))
    assert w_once == K * whole.grid[0]  # each expert's block once per output tile
    assert w_copies == K * 2 * plan.grid[0] * plan.grid[2]  # chunked: again for every row tile


def test_batch_512_on_32_shards_reads_each_expert_once_and_few_activations():
    """K2 at batch 512 over 32 expert shards (12 local experts, ~11 rows each): the row tile
    follows an expert's expected rows, so each local expert's weights are copied once and the
    activations (re-read for every output tile) stay below a quarter of them; 128-row tiles
    copied as many activation bytes as weight bytes."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(512)]).astype(np.int32)
    counted = pallas_reads(ids, expert_offset=0, num_local=12, hidden=D, inter=M, num_total=E)
    assert counted["values"] + counted["scales"] == 12 * PER_EXPERT
    assert counted["activations"] < (counted["values"] + counted["scales"]) / 4


@pytest.mark.parametrize("t", [1, 8])
def test_pallas_decode_reads_int4_once(mesh, t):
    ratio, temps = _check(_compile_decode(mesh, t, "pallas", "int4"), t, "pallas")
    assert ratio <= BOUND, ratio
    assert not temps, temps


def test_naive_scale_then_einsum_fails_the_same_check(mesh):
    ratio, temps = _check(_compile_decode(mesh, 1, "naive", "words"), 1, "naive")
    assert ratio > BOUND and temps, (ratio, temps)


def test_pallas_compiles_for_k2_shapes(mesh):
    dev = mesh.devices.flat[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    for inp, out, rows, tm in ((D, M, 64, 8), (M, D, 64, 8), (D, M, 1024, 128), (M, D, 1024, 128)):
        args = (
            jax.ShapeDtypeStruct((rows, inp), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((rows // tm,), jnp.int32, sharding=sh),
            jax.ShapeDtypeStruct((1,), jnp.int32, sharding=sh),
            jax.ShapeDtypeStruct((96, inp // GS, GS, out), jnp.int4, sharding=sh),
            jax.ShapeDtypeStruct((96, inp // GS, out), jnp.bfloat16, sharding=sh),
        )
        # No mesh says "TPU" to the kernel here, so ask for the compiled kernel explicitly.
        fn = jax.jit(lambda *a, tm=tm: int4_pallas.grouped_int4_matmul(*a, tm=tm, interpret=False))
        hlo = fn.lower(*args).compile().as_text()
        assert 'custom_call_target="tpu_custom_call"' in hlo


def _compile_layer_stack(mesh, in_place: bool):
    """Decode over layer ``layer`` of a 2-layer expert stack [L, E, ...] (what the model's scan
    holds), the stack passed whole with the index (``in_place``) or sliced first."""
    rep = NamedSharding(mesh, P())
    e_local = E // mesh.size
    stack = P(None, "expert")

    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, stack))

    def one(o, i):
        return Int4Weight(
            sds((2, E, i // GS, GS, o), jnp.int4), sds((2, E, i // GS, o), jnp.bfloat16)
        )

    def step(x, ids, wts, layer, g, u, d):
        def local(x, ids, wts, layer, g, u, d):
            if in_place:
                ws = [Int4Weight(w.values, w.scale, layer) for w in (g, u, d)]
            else:
                ws = [Int4Weight(w.values[layer], w.scale[layer]) for w in (g, u, d)]
            off = jax.lax.axis_index("expert") * e_local
            y = routed_experts(x, ids, wts, *ws, expert_offset=off, impl="pallas")
            return jax.lax.psum(y.astype(jnp.float32), "expert").astype(x.dtype)

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(), P(), P(), stack, stack, stack),
            out_specs=P(),
            check_vma=False,
        )(x, ids, wts, layer, g, u, d)

    args = (
        jax.ShapeDtypeStruct((1, D), jnp.bfloat16, sharding=rep),
        jax.ShapeDtypeStruct((1, K), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct((1, K), jnp.float32, sharding=rep),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        one(M, D),
        one(M, D),
        one(D, M),
    )
    return jax.jit(step).lower(*args).compile()


def test_pallas_reads_a_layer_stack_in_place(mesh):
    """A custom call's operand is not fused: slicing the stack first copies the layer's local
    experts (the copy the model's scan made before every MoE layer); indexing the stack in the
    kernel (``Int4Weight.layer``) copies nothing and reads within the same bound."""
    compiled = _compile_layer_stack(mesh, in_place=True)
    ratio, temps = _check(compiled, 1, "pallas")
    assert ratio <= BOUND and not temps, (ratio, temps)
    _, sliced_temps = _check(_compile_layer_stack(mesh, in_place=False), 1, "pallas")
    assert sliced_temps, "slicing the stack before the kernel no longer copies: update the docs"


def _row_counts(hlo: str) -> set[int]:
    """Leading sizes of the [rows, D] and [rows, 1, D] arrays an HLO program makes."""
    rows = set()
    for _, dims in _SHAPE.findall(hlo):
        shape = [int(d) for d in dims.split(",") if d]
        if shape[-1:] == [D] and (len(shape) == 2 or shape[1:-1] == [1]):
            rows.add(shape[0])
    return rows


def test_one_token_takes_one_row_tiles(mesh, monkeypatch):
    """Batch-1 decode: each of the token's choices is its own one-row tile, so the rows XLA
    builds and reads around the kernels ([rows, D] activations in, float32 out) are at most the
    8 choices, not 8 tiles of 8 rows. Measured here: XLA's bytes 4.0 MB against 8.7 MB with
    8-row tiles forced."""
    from k2jax.model import expert_matmul

    one_row = _compile_decode(mesh, 1, "pallas", "int4")
    assert max(_row_counts(one_row.as_text())) <= K
    monkeypatch.setattr(expert_matmul, "pallas_tile_rows", lambda *a, **k: 8)
    eight_rows = _compile_decode(mesh, 1, "pallas", "int4")
    assert max(_row_counts(eight_rows.as_text())) == K * 8  # the check can see padded tiles
    xla = [c.cost_analysis()["bytes accessed"] for c in (one_row, eight_rows)]
    assert xla[0] < xla[1], xla
