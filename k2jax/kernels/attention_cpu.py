"""Absorbed MLA attention over the paged latent cache on the CPU:
k2jax/kernels/csrc/latent_attention.cc, called through the XLA FFI.

``attend(q_BTNW, pages, layer, block_tables_BP, positions_BT, scale, latent)`` returns
out [B, T, N, latent] float32 with

    out[b, t, n] = sum_s softmax_s(scale * q[b, t, n] . row_s) * row_s[:latent]
                   over key positions 0 <= s <= pos[b, t]

where row_s is key position s of row b's pages in ``layer`` of the pool [L, P, K, W]: page
``block_tables[b, s // K]``, slot ``s % K``. It reads the pool in place (no gather of a row's
pages), widens each bf16 row to float32 once, and splits a query's keys over threads when the
queries are fewer than the threads (decode). Padding queries (negative positions) get zeros.
Where the kernel library was not built, ``k2jax.model.attention`` uses its jnp form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.kernels import cpu_library

TARGET = "k2jax_latent_attention"


def attend(
    q_BTNW: jax.Array,
    pages: jax.Array,
    layer: jax.Array | int,
    block_tables_BP: jax.Array,
    positions_BT: jax.Array,
    *,
    scale: float,
    latent: int,
    isa: str = "auto",
) -> jax.Array:
    """Softmax attention of the queries over their rows' cached latents; see the module doc."""
    cpu_library.require()
    isa_attr = np.int32(cpu_library.isa_code(isa))
    b, t, n, w = q_BTNW.shape
    if pages.ndim != 4 or pages.shape[-1] != w:
        raise ValueError(f"pages must be [L, P, K, {w}] (the query's width), got {pages.shape}")
    if pages.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"pages must be bfloat16 or float32, got {pages.dtype}")
    if block_tables_BP.shape[0] != b or positions_BT.shape != (b, t):
        raise ValueError(
            f"block tables {block_tables_BP.shape} and positions {positions_BT.shape} must have "
            f"the queries' batch {b} (and positions their length {t})"
        )
    if not 0 < latent <= w:
        raise ValueError(f"latent must be in (0, {w}], got {latent}")
    call = jax.ffi.ffi_call(
        TARGET,
        jax.ShapeDtypeStruct((b, t, n, latent), jnp.float32),
        vmap_method="sequential",
    )
    return call(
        q_BTNW.astype(jnp.float32),
        pages,
        jnp.asarray(layer, jnp.int32),
        block_tables_BP.astype(jnp.int32),
        positions_BT.astype(jnp.int32),
        scale=np.float32(scale),
        latent=np.int32(latent),
        isa=isa_attr,
    )
