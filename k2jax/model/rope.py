"""YaRN rotary embedding over the R rope dims, in the "two halves" layout.

The checkpoint lays each rope vector out as interleaved pairs (2j, 2j+1). The loader permutes
those weight rows once into halves (evens then odds; see ``convert.hf_names``), so here dim j
rotates with dim j + R/2, which equals the reference's interleaved rotation followed by its
de-interleave, exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.model.config import Config


def inv_frequencies(cfg: Config) -> np.ndarray:
    """float32 [R/2]: base frequencies, with YaRN's ramp between extrapolation and /factor."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
    rs = cfg.rope_scaling
    if rs.factor <= 1:
        return extrapolation
    interpolation = (np.float32(1.0) / (np.float32(rs.factor) * pos_freqs)).astype(np.float32)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a step instead of a ramp; avoids dividing by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def rope_tables(cfg: Config, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin, float32 [B, T, R/2], for integer positions (negative ones are padding)."""
    inv_freq = jnp.asarray(inv_frequencies(cfg))
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    factor = cfg.rope_attention_factor
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x_BTNR: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
    """Rotate dims j and j + R/2 together; x is [B, T, (N,) R], the tables [B, T, R/2]."""
    half = x_BTNR.shape[-1] // 2
    if x_BTNR.ndim == 4:
        cos_BTR, sin_BTR = cos_BTR[:, :, None], sin_BTR[:, :, None]
    cos, sin = cos_BTR.astype(x_BTNR.dtype), sin_BTR.astype(x_BTNR.dtype)
    x1, x2 = x_BTNR[..., :half], x_BTNR[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
