"""K2 Thinking's INT4 packing, the one format description the model and the kernels share.

compressed-tensors ``pack-quantized``, symmetric, one bf16 scale per ``group_size`` input
columns: a weight W[..., O, I] is held as

- ``packed``: int32 [..., O, I/8]; the nibble for input column 8j + k sits in bits 4k..4k+3 of
  word j (lowest nibble first) and stores q + 8 for q in [-8, 7];
- ``scale``: bf16 [..., O, I/G];

so that W[o, i] = (nibble - 8) * scale[o, i // G]: 4 bits per weight plus 16 bits per group,
4.5 bits per weight for G = 32. The weight classes built on it live in ``k2jax.model.quant``;
this module sits below both them and the kernels, so neither imports the other's layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NIBBLES_PER_WORD = 8
OFFSET = 8  # stored nibble = q + OFFSET
GROUP_SIZE = 32  # K2 Thinking's group size


def unpack_int4(packed: jax.Array) -> jax.Array:
    """Signed INT4 values as int8 [..., O, I] from packed int32 words [..., O, I/8].

    Bitcasting an int32 word to ``uint4`` yields its 8 nibbles lowest first, which is the
    checkpoint's order; subtracting the offset 8 gives q in [-8, 7].
    """
    nibbles = jax.lax.bitcast_convert_type(packed.astype(jnp.int32), jnp.uint4)
    values = nibbles.astype(jnp.int8) - OFFSET
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * NIBBLES_PER_WORD)


def words_to_int4(packed: jax.Array) -> jax.Array:
    """Signed ``int4`` [..., O, I/8, 8] from packed words [..., O, I/8], in column order.

    Bitcasting a word XOR 0x88888888 to int4 yields its eight signed values lowest nibble first
    (the XOR flips each nibble's offset-8 bias into two's complement).
    """
    flipped = packed.astype(jnp.int32) ^ jnp.int32(-0x77777778)  # 0x88888888 as int32
    return jax.lax.bitcast_convert_type(flipped, jnp.int4)


def pack_int4_numpy(values: np.ndarray) -> np.ndarray:
    """Pack signed INT4 values int [..., O, I] (I divisible by 8) into int32 words [..., O, I/8].

    Host-side, for building models and test fixtures; the checkpoint's own packing comes from
    compressed-tensors.
    """
    values = np.asarray(values)
    if values.min(initial=0) < -8 or values.max(initial=0) > 7:
        raise ValueError("INT4 values must lie in [-8, 7]")
    if values.shape[-1] % NIBBLES_PER_WORD:
        raise ValueError(f"the last axis ({values.shape[-1]}) must be a multiple of 8")
    nibbles = (values + OFFSET).astype(np.uint32).reshape(*values.shape[:-1], -1, NIBBLES_PER_WORD)
    shifts = 4 * np.arange(NIBBLES_PER_WORD, dtype=np.uint32)
    words = np.bitwise_or.reduce(nibbles << shifts, axis=-1)
    return words.view(np.int32)
