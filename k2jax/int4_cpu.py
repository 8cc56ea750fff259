"""The CPU's fused INT4 expert matvec: k2jax/csrc/int4_matvec.cc, called through the XLA FFI.

``project(x_RI, expert_ids_P, w)`` computes y[p] = W[expert_ids[p]] @ x[p // k] for packed
``QuantizedWeight`` experts without widening them: each expert's packed rows are decoded in
registers and multiplied against every pair routed to it, reading 4.5 bits per weight. It is
the CPU counterpart of the TPU Pallas kernel (k2jax.int4_pallas); docs/int4.md has the
measurements that made it the CPU's default.

The kernel lives in k2jax's CPU kernel library (``k2jax.cpu_kernels``). Where that was not
built, ``supports`` is False and ``k2jax.expert_matmul`` falls back to its jnp formulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import cpu_kernels
from k2jax.quant import QuantizedWeight

TARGET = "k2jax_int4_matvec"
GROUP_SIZE = 32  # the kernel's group size (K2's); other sizes use the jnp formulation


def supports(w: QuantizedWeight) -> bool:
    """Whether the kernel handles weight ``w`` (group size 32) and is available."""
    return w.group_size == GROUP_SIZE and cpu_kernels.available()


def project(
    x_RI: jax.Array, expert_ids_P: jax.Array, w: QuantizedWeight, *, isa: str = "auto"
) -> jax.Array:
    """y [P, O] float32, y[p] = W[expert_ids[p]] @ x[p // k] with k = P / R pairs per row of x
    (a token's k choices share its row); pairs whose id is not in [0, E) get zeros.

    ``w`` is [E, O, I] (packed [E, O, I/8], scales [E, O, I/32]) or, with ``w.layer`` set, a
    layer stack read in place at that layer (no copy of the layer's experts).
    """
    cpu_kernels.require()
    if w.group_size != GROUP_SIZE:
        raise ValueError(f"the CPU INT4 kernel needs group size {GROUP_SIZE}, got {w.group_size}")
    isa_attr = np.int32(cpu_kernels.isa_code(isa))
    num_rows, inputs = x_RI.shape
    (num_pairs,) = expert_ids_P.shape
    if num_pairs % num_rows:
        raise ValueError(f"{num_pairs} pairs do not split evenly over {num_rows} rows of x")
    *_, outputs, words = w.packed.shape
    if words * 8 != inputs:
        raise ValueError(f"x has {inputs} inputs but the weight {words * 8}")
    layer = jnp.zeros((), jnp.int32) if w.layer is None else jnp.asarray(w.layer, jnp.int32)
    # Under vmap (flax's layer scans at init) each mapped call is its own problem: run them in
    # turn.
    call = jax.ffi.ffi_call(
        TARGET,
        jax.ShapeDtypeStruct((num_pairs, outputs), jnp.float32),
        vmap_method="sequential",
    )
    return call(
        x_RI.astype(jnp.float32),
        expert_ids_P.astype(jnp.int32),
        w.packed.astype(jnp.int32),
        w.scale.astype(jnp.bfloat16),
        layer,
        isa=isa_attr,
        choices=np.int32(num_pairs // num_rows),
    )
