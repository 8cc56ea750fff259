"""INT4 weights as K2 Thinking stores them, kept packed in device memory.

Layout (compressed-tensors ``pack-quantized``, symmetric, one bf16 scale per ``group_size``
input columns): a weight W[..., O, I] is held as

- ``packed``: int32 [..., O, I/8]; the nibble for input column 8j + k sits in bits 4k..4k+3 of
  word j (lowest nibble first) and stores q + 8 for q in [-8, 7];
- ``scale``: bf16 [..., O, I/G];

so that W[o, i] = (nibble - 8) * scale[o, i // G]. That is 4 bits per weight plus 16 bits per
group: 4.5 bits per weight for G = 32, on every backend (int32 words take exactly their bytes,
whereas ``jnp.int4`` arrays take a byte per element on the CPU).

``QuantizedWeight`` is a registered pytree, so stacked layers and experts slice, scan, shard and
checkpoint like plain arrays. The expert matmuls that consume it live in ``k2jax.expert_matmul``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NIBBLES_PER_WORD = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """An INT4 weight [..., O, I]: packed int32 words [..., O, I/8] + scales [..., O, I/G].

    With ``layer`` set (an int32 scalar), ``packed`` / ``scale`` are a whole layer stack [L, ...]
    and the weight is layer ``layer`` of it. The model passes its routed experts this way so a
    loop over tiles can index the chosen experts in place: a scan's per-layer slice feeding an
    inner loop would be materialized, copying every expert of the layer each step.
    """

    packed: jax.Array
    scale: jax.Array
    group_size: int = dataclasses.field(default=32, metadata={"static": True})
    layer: jax.Array | None = None

    def unstacked(self) -> QuantizedWeight:
        """This layer's weight without the stack (itself when ``layer`` is None)."""
        if self.layer is None:
            return self
        return QuantizedWeight(
            jax.lax.dynamic_index_in_dim(self.packed, self.layer, keepdims=False),
            jax.lax.dynamic_index_in_dim(self.scale, self.layer, keepdims=False),
            self.group_size,
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (unpacked) shape [..., O, I] (of one layer when ``layer`` is set)."""
        *lead, out, words = self.packed.shape
        if self.layer is not None:
            lead = lead[1:]
        return (*lead, out, words * NIBBLES_PER_WORD)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The dense weight [..., O, I] in ``dtype`` (products are exact in float32)."""
        if self.layer is not None:
            return self.unstacked().dequantize(dtype)
        q = unpack_int4(self.packed)
        *lead, out, inp = q.shape
        groups = q.reshape(*lead, out, inp // self.group_size, self.group_size)
        w = groups.astype(dtype) * self.scale.astype(dtype)[..., None]
        return w.reshape(*lead, out, inp)

    def nbytes_on_device(self) -> int:
        """Bytes the two arrays occupy on their devices."""
        return sum(_device_bytes(a) for a in (self.packed, self.scale))


def _device_bytes(a) -> int:
    if isinstance(a, jax.Array):
        return a.on_device_size_in_bytes()
    return np.asarray(a).nbytes


def unpack_int4(packed: jax.Array) -> jax.Array:
    """Signed INT4 values as int8 [..., O, I] from packed int32 words [..., O, I/8].

    Bitcasting an int32 word to ``uint4`` yields its 8 nibbles lowest first, which is the
    checkpoint's order; subtracting the offset 8 gives q in [-8, 7].
    """
    nibbles = jax.lax.bitcast_convert_type(packed.astype(jnp.int32), jnp.uint4)
    values = nibbles.astype(jnp.int8) - 8
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * NIBBLES_PER_WORD)


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
    nibbles = (values + 8).astype(np.uint32).reshape(*values.shape[:-1], -1, NIBBLES_PER_WORD)
    shifts = 4 * np.arange(NIBBLES_PER_WORD, dtype=np.uint32)
    words = np.bitwise_or.reduce(nibbles << shifts, axis=-1)
    return words.view(np.int32)


def quantize_int4_numpy(w: np.ndarray, group_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric group quantization of w [..., O, I]: (int32 packed [..., O, I/8], bf16 scales).

    Scales are amax / 7.5 rounded to bf16 (as compressed-tensors' minmax observer does), values
    are round(w / scale) clipped to [-8, 7].
    """
    import ml_dtypes

    w = np.asarray(w, np.float32)
    *lead, out, inp = w.shape
    groups = w.reshape(*lead, out, inp // group_size, group_size)
    amax = np.abs(groups).max(axis=-1)
    scale = (amax / 7.5).astype(ml_dtypes.bfloat16)
    safe = np.where(scale.astype(np.float32) == 0, 1.0, scale.astype(np.float32))
    q = np.clip(np.round(groups / safe[..., None]), -8, 7).astype(np.int8)
    return pack_int4_numpy(q.reshape(*lead, out, inp)), scale
