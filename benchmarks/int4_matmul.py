"""INT4 expert projection: TPU-compiler bytes per formulation, and CPU wall time.

(a) For each formulation, compile one projection y = x @ W^T ahead of time with the real XLA:TPU
    compiler (libtpu, JAX_PLATFORMS=cpu) and report bytes accessed and temporary bytes against
    the packed INT4 + scale bytes. The Pallas kernel's weight reads are invisible to XLA's cost
    analysis; they are added from its BlockSpecs (each 8-row tile streams the weight once; the
    MoE prefill path uses 128-row tiles) and marked "+kernel".
(b) On this CPU, wall time of the CPU formulations (packed int32 words: the fused kernel of
    k2jax.kernels.int4_cpu, the default, and the two jnp ones) against a float32 matvec on the
    dequantized weight and a bf16 one.

    python benchmarks/int4_matmul.py [--json] [--skip-cpu] [--skip-tpu] [--topologies v5p:2x2x1]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from k2jax.kernels import (
    int4_cpu,  # noqa: E402
    int4_pallas,  # noqa: E402
)
from k2jax.model.quant import QuantizedWeight  # noqa: E402

GS = 32
SHAPES = {
    "k2 gate/up": (2048, 7168),
    "k2 down": (7168, 2048),
    "mid gate/up": (512, 1024),
    "mid down": (1024, 512),
}  # (O, I)
BATCHES = (1, 8, 64)


def _tpu_formulations(o, i, b):
    """name -> (fn, arg specs as (shape, dtype)); x is [B, I] bf16."""
    g = i // GS
    bf, i4 = jnp.bfloat16, jnp.int4
    f32 = jnp.float32
    x = ((b, i), bf)

    def dot(x, w):
        return jnp.einsum("BI,OI->BO", x, w, preferred_element_type=f32)

    return {
        "bf16 weights (baseline)": (dot, [x, ((o, i), bf)]),
        "naive: scale then einsum": (
            lambda x, q, s: dot(x, (q.astype(bf).reshape(o, g, GS) * s[..., None]).reshape(o, i)),
            [x, ((o, i), i4), ((o, g), bf)],
        ),
        "int32 words, xor+bitcast": (
            lambda x, p, s: jnp.einsum(
                "BGRK,OGRK->BO",
                x.reshape(b, g, 4, 8),
                jax.lax.bitcast_convert_type(p ^ jnp.int32(-0x77777778), i4).astype(bf)
                * s[..., None, None],
                preferred_element_type=f32,
            ),
            [x, ((o, g, 4), jnp.int32), ((o, g), bf)],
        ),
        "int4 [O,G,S], grouped dot then scale": (
            lambda x, q, s: jnp.einsum(
                "BOG,OG->BO",
                jnp.einsum(
                    "BGS,OGS->BOG", x.reshape(b, g, GS), q.astype(bf), preferred_element_type=f32
                ),
                s.astype(f32),
            ),
            [x, ((o, g, GS), i4), ((o, g), bf)],
        ),
        "int4 [O,G,S], scale fused (no reshape)": (
            lambda x, q, s: jnp.einsum(
                "BGS,OGS->BO",
                x.reshape(b, g, GS),
                q.astype(bf) * s[..., None],
                preferred_element_type=f32,
            ),
            [x, ((o, g, GS), i4), ((o, g), bf)],
        ),
        "int4 [G,S,O], scale fused (runtime layout)": (
            lambda x, q, s: jnp.einsum(
                "BGS,GSO->BO",
                x.reshape(b, g, GS),
                q.astype(bf) * s[:, None, :],
                preferred_element_type=f32,
            ),
            [x, ((g, GS, o), i4), ((g, o), bf)],
        ),
        "pallas kernel (+kernel)": (
            lambda x, q, s: int4_pallas.grouped_int4_matmul(
                jnp.pad(x, ((0, -b % 8), (0, 0))),
                jnp.zeros(((b + 7) // 8,), jnp.int32),
                jnp.array([(b + 7) // 8], jnp.int32),
                q,
                s,
                tm=8,
                interpret=False,  # compiled for the TPU device (no mesh says so here)
            )[:b],
            [x, ((1, g, GS, o), i4), ((1, g, o), bf)],
        ),
    }


def _counted_kernel_bytes(o: int, i: int, b: int) -> int:
    """HBM bytes the Pallas kernel copies for b rows of one expert: the block copies its own
    index maps issue over its grid (``int4_pallas.count_copies``), 8-row tiles."""
    tiles = -(-b // 8)
    plan = int4_pallas.tiling((i // GS, tiles * 8, GS), (1, i // GS, GS, o), tm=8)
    copies = int4_pallas.count_copies(plan, np.zeros(tiles, np.int32), tiles)
    return sum(n * nbytes for n, nbytes in zip(copies, plan.block_bytes, strict=True))


def tpu_table(topologies):
    from jax.experimental import topologies as topo_mod

    rows = []
    for topo in topologies:
        dev = topo_mod.get_topology_desc(topology_name=topo, platform="tpu").devices[0]
        sh = jax.sharding.SingleDeviceSharding(dev)
        for name, (o, i) in SHAPES.items():
            int4_bytes = o * i // 2 + o * (i // GS) * 2
            for b in BATCHES:
                for form, (fn, specs) in _tpu_formulations(o, i, b).items():
                    args = [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in specs]
                    try:
                        c = jax.jit(fn).lower(*args).compile()
                    except Exception as e:  # a formulation the compiler rejects is a result too
                        rows.append(
                            dict(
                                topology=topo,
                                shape=name,
                                batch=b,
                                formulation=form,
                                error=str(e).splitlines()[0][:80],
                            )
                        )
                        continue
                    accessed = c.cost_analysis()["bytes accessed"]
                    if "+kernel" in form:
                        # Counted: the block copies the kernel's index maps issue over its grid.
                        tiles = -(-b // 8)
                        plan = int4_pallas.tiling(
                            (i // GS, tiles * 8, GS), (1, i // GS, GS, o), tm=8
                        )
                        copies = int4_pallas.count_copies(plan, np.zeros(tiles, np.int32), tiles)
                        accessed += sum(
                            n * nb for n, nb in zip(copies, plan.block_bytes, strict=True)
                        )
                    rows.append(
                        dict(
                            topology=topo,
                            shape=name,
                            batch=b,
                            formulation=form,
                            bytes_accessed=accessed,
                            temp_bytes=c.memory_analysis().temp_size_in_bytes,
                            int4_bytes=int4_bytes,
                            ratio=accessed / int4_bytes,
                        )
                    )
    return rows


def _time(fn, *args, reps=5):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def words_decode_project(x_PI, packed_POW, scale_POG):
    """The ``words_decode`` counter-example (it lost to the fused kernel and to widening one
    expert per tile, and left the package): y[p, o] = sum_i x[p, i] W_p[o, i] from packed words
    in float32, nibbles unpacked by shifts along a new minor axis so convert, multiply and group
    sum fuse into one loop over the input axis, the scale applied to the per-group sums."""
    p, out, words = packed_POW.shape
    groups = scale_POG.shape[-1]
    w_POGW = packed_POW.reshape(p, out, groups, words // groups)
    shifts = jnp.arange(0, 32, 4, dtype=jnp.int32).reshape(1, 1, 1, 1, 8)
    q = ((w_POGW[..., None] >> shifts) & 0xF).astype(jnp.float32) - 8.0  # [P, O, G, S/8, 8]
    x = x_PI.astype(jnp.float32).reshape(p, 1, groups, words // groups, 8)
    partial_POG = jnp.sum(x * q, axis=(3, 4))
    return jnp.sum(partial_POG * scale_POG.astype(jnp.float32), axis=2)


def cpu_table():
    rng = np.random.default_rng(0)
    rows = []
    for name, (o, i) in SHAPES.items():
        words = jnp.asarray(rng.integers(-(2**31), 2**31, (1, o, i // 8)).astype(np.int32))
        scale = jnp.asarray(rng.uniform(0.01, 0.02, (1, o, i // GS)), jnp.bfloat16)
        w = QuantizedWeight(words, scale, GS)
        wf = w.dequantize()[0]
        wb = wf.astype(jnp.bfloat16)
        for b in BATCHES:
            x = jnp.asarray(rng.standard_normal((b, i)), jnp.float32)
            t_f32 = _time(lambda x, w: x @ w.T, x, wf)
            t_bf16 = _time(
                lambda x, w: jnp.dot(
                    x.astype(jnp.bfloat16), w.T, preferred_element_type=jnp.float32
                ),
                x,
                wb,
            )
            ids = jnp.zeros((b,), jnp.int32)
            # The fused kernel (cpu_kernel, the CPU default): packed rows decoded in registers.
            t_kernel = _time(
                lambda x, p, s, ids: int4_cpu.project(x, ids, p, s, GS),
                x,
                words,
                scale,
                ids,
            )
            # The jnp per-pair projection (words_decode)...
            t_dec = _time(
                lambda x, p, s, ids: words_decode_project(x, p[ids], s[ids]), x, words, scale, ids
            )
            # ...and the tiled one (words_tiled: widen the tile's expert once, then a dot).
            t_grp = _time(
                lambda x, p, s: x @ QuantizedWeight(p, s, GS).dequantize()[0].T, x, words, scale
            )
            rows.append(
                dict(
                    shape=name,
                    batch=b,
                    f32_dequantized_ms=t_f32 * 1e3,
                    bf16_ms=t_bf16 * 1e3,
                    cpu_kernel_ms=t_kernel * 1e3,
                    words_decode_ms=t_dec * 1e3,
                    words_tiled_ms=t_grp * 1e3,
                    kernel_vs_f32=t_kernel / t_f32,
                    decode_vs_f32=t_dec / t_f32,
                    grouped_vs_f32=t_grp / t_f32,
                    decode_vs_bf16=t_dec / t_bf16,
                )
            )
    return rows


def _markdown(rows, cols):
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, r.get("error", ""))
            if isinstance(v, float):
                v = f"{v / 1e6:.2f} MB" if "bytes" in c else f"{v:.2f}"
            elif isinstance(v, int) and "bytes" in c:
                v = f"{v / 1e6:.2f} MB"
            cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-tpu", action="store_true")
    ap.add_argument("--topologies", default="v5p:2x2x1,v6e:2x2")
    a = ap.parse_args()
    result = {}
    if not a.skip_tpu:
        result["tpu"] = tpu_table(a.topologies.split(","))
    if not a.skip_cpu:
        result["cpu"] = cpu_table()
    if a.json:
        print(json.dumps(result, indent=1))
        return
    if "tpu" in result:
        print("## TPU compiler (ahead of time): bytes accessed / packed INT4+scale bytes\n")
        print(
            _markdown(
                result["tpu"],
                [
                    "topology",
                    "shape",
                    "batch",
                    "formulation",
                    "bytes_accessed",
                    "temp_bytes",
                    "ratio",
                ],
            )
        )
    if "cpu" in result:
        print("\n## CPU wall time (ms, best of 5)\n")
        print(
            _markdown(
                result["cpu"],
                [
                    "shape",
                    "batch",
                    "f32_dequantized_ms",
                    "bf16_ms",
                    "cpu_kernel_ms",
                    "words_decode_ms",
                    "words_tiled_ms",
                    "kernel_vs_f32",
                    "decode_vs_f32",
                    "grouped_vs_f32",
                    "decode_vs_bf16",
                ],
            )
        )


if __name__ == "__main__":
    main()
