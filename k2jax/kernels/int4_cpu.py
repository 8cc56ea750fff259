"""The CPU's fused INT4 expert matvec (k2jax/kernels/csrc/int4_matvec.cc, through the XLA FFI).

``project(x_RI, expert_ids_P, packed, scale, group_size)`` computes
y[p] = W[expert_ids[p]] @ x[p // k] for experts in K2's packed INT4 format
(``k2jax.kernels.int4_format``) without widening them: each expert's packed rows are decoded in
registers and multiplied against every pair routed to it, reading 4.5 bits per weight. It is
the CPU counterpart of the TPU Pallas kernel (k2jax.kernels.int4_pallas); docs/int4.md has the
measurements that made it the CPU's default.

The kernel lives in k2jax's CPU kernel library (``k2jax.kernels.cpu_library``). Where that was not
built, ``supports`` is False and ``k2jax.model.expert_matmul`` falls back to its jnp formulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.kernels import cpu_library
from k2jax.kernels.int4_format import GROUP_SIZE, NIBBLES_PER_WORD

TARGET = "k2jax_int4_matvec"


def supports(group_size: int) -> bool:
    """Whether the kernel handles weights of ``group_size`` (it needs K2's 32) and is built."""
    return group_size == GROUP_SIZE and cpu_library.available()


def project(
    x_RI: jax.Array,
    expert_ids_P: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    group_size: int = GROUP_SIZE,
    *,
    layer: jax.Array | None = None,
    isa: str = "auto",
) -> jax.Array:
    """y [P, O] float32, y[p] = W[expert_ids[p]] @ x[p // k] with k = P / R pairs per row of x
    (a token's k choices share its row); pairs whose id is not in [0, E) get zeros.

    The weight is [E, O, I] (``packed`` int32 [E, O, I/8], ``scale`` bf16 [E, O, I/32]) or,
    with ``layer`` set, a layer stack [L, E, ...] read in place at that layer (no copy of the
    layer's experts).
    """
    cpu_library.require()
    if group_size != GROUP_SIZE:
        raise ValueError(f"the CPU INT4 kernel needs group size {GROUP_SIZE}, got {group_size}")
    isa_attr = np.int32(cpu_library.isa_code(isa))
    num_rows, inputs = x_RI.shape
    (num_pairs,) = expert_ids_P.shape
    if num_pairs % num_rows:
        raise ValueError(f"{num_pairs} pairs do not split evenly over {num_rows} rows of x")
    *_, outputs, words = packed.shape
    if words * NIBBLES_PER_WORD != inputs:
        raise ValueError(f"x has {inputs} inputs but the weight {words * NIBBLES_PER_WORD}")
    layer = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)
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
        packed.astype(jnp.int32),
        scale.astype(jnp.bfloat16),
        layer,
        isa=isa_attr,
        choices=np.int32(num_pairs // num_rows),
    )
