"""``Model``: a config, its params on device, and the jitted entry points users call."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import model as k2model
from k2jax.config import Config


def as_token_array(token_ids: Sequence[Sequence[int]] | np.ndarray, vocab_size: int) -> np.ndarray:
    """Equal-length prompts as int32 [B, T]; refuses ragged batches and out-of-vocab ids."""
    if isinstance(token_ids, np.ndarray | jax.Array):
        arr = np.asarray(token_ids)
    else:
        rows = [list(r) for r in token_ids]
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError("token_ids must be a non-empty batch of equal-length prompts")
        arr = np.asarray(rows)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"token_ids must have shape [batch, tokens], got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int32)


class Model:
    """A loaded K2 model. ``params`` is the pytree ``k2jax.model`` documents."""

    def __init__(self, config: Config, params: dict, dtype=jnp.bfloat16, mesh=None):
        self.config = config
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh

    @functools.cached_property
    def _logits_fn(self):
        cfg, dtype = self.config, self.dtype

        @jax.jit
        def run(params, tokens_BT):
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
            x_BTD, _ = k2model.forward(params, tokens_BT, positions_BT, cfg=cfg, dtype=dtype)
            return k2model.lm_logits(params, x_BTD, cfg=cfg, dtype=dtype)

        return run

    def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """float32 [B, T, V]: a full causal forward pass over equal-length prompts."""
        tokens = as_token_array(token_ids, self.config.vocab_size)
        return np.asarray(self._logits_fn(self.params, jnp.asarray(tokens)), np.float32)

    def expert_bits_per_weight(self) -> float:
        """Device bytes of the routed experts (payload + scales) * 8 / their weight count."""
        experts = self.params["moe_layers"]["moe"]["experts"]
        nbytes = sum(a.on_device_size_in_bytes() for a in jax.tree.leaves(experts))
        weights = sum(a.size * 8 for name, a in experts.items() if name.endswith("_packed"))
        return nbytes * 8 / weights
