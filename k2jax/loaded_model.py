"""``Model``: a config, its params on device, and the jitted entry points users call."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

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

    def __init__(
        self, config: Config, params: dict, dtype=jnp.bfloat16, mesh=None, rules=None
    ) -> None:
        """``params`` already placed (on one device, or on ``mesh`` by the rules table).

        ``rules`` are the logical-axis rules in ``flax.linen.logical_axis_rules`` form (what
        ``sharding.rules.flax_rules(strategy)`` returns); the model's activation hints and its
        expert parallelism follow them. A mesh without rules still runs correctly, the
        partitioner then placing every collective itself (routed experts unsplit in compute).
        """
        self.config = config
        self.params = params
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self.rules = tuple(rules or ())

    def _on_mesh(self, fn):
        """``fn`` traced and run with this model's mesh and rules as the context."""
        if self.mesh is None:
            return fn
        mesh, rules = self.mesh, self.rules

        def call(*args):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                return fn(*args)

        return call

    def _replicated(self, host: np.ndarray) -> jax.Array:
        """A host array as a global array copied to every device of the mesh (any process)."""
        if self.mesh is None:
            return jnp.asarray(host)
        sharding = NamedSharding(self.mesh, PartitionSpec())
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    @functools.cached_property
    def _logits_fn(self):
        cfg, dtype = self.config, self.dtype

        def run(params, tokens_BT):
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
            x_BTD, _ = k2model.forward(params, tokens_BT, positions_BT, cfg=cfg, dtype=dtype)
            return k2model.lm_logits(params, x_BTD, cfg=cfg, dtype=dtype)

        # Whole logits on every device, so each process (multi-host included) can read them.
        out = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
        return self._on_mesh(jax.jit(run, out_shardings=out))

    def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """float32 [B, T, V]: a full causal forward pass over equal-length prompts."""
        tokens = as_token_array(token_ids, self.config.vocab_size)
        return np.asarray(self._logits_fn(self.params, self._replicated(tokens)), np.float32)

    def expert_bits_per_weight(self) -> float:
        """Device bytes of the routed experts (payload + scales) * 8 / their weight count."""
        experts = self.params["moe_layers"]["moe"]["experts"]
        nbytes = sum(a.on_device_size_in_bytes() for a in jax.tree.leaves(experts))
        weights = sum(
            a.size * (8 if name.endswith("_packed") else 1)
            for name, a in experts.items()
            if name.endswith(("_packed", "_values"))
        )
        return nbytes * 8 / weights

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] | None = None,
        page_size: int = 16,
        num_pages: int | None = None,
        logprobs: bool = False,
        max_batch: int = 8,
        prefill_chunk: int = 128,
        cache_dtype: str | None = None,
        preempt: bool = True,
        compiler_options: dict | None = None,
    ) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
        """The new token ids of each prompt (its stop token included), in prompt order.

        Sampling follows ``k2jax.sampling.SamplingParams`` (K2 Thinking's defaults: temperature
        1.0, top_p 1.0; temperature 0 is greedy); prompt i draws with seed ``seed + i``.
        ``stop_token_ids=None`` stops at the config's eos (``<|im_end|>`` for K2), ``[]`` never
        stops early. The engine knobs (``page_size``, ``num_pages``, ``max_batch``,
        ``prefill_chunk``, ``cache_dtype``, ``preempt``, ``compiler_options``) are
        ``k2jax.engine.EngineConfig``'s.
        With ``logprobs=True`` returns ``(tokens, logprobs)``, the raw logprob of each token.
        """
        from k2jax import engine  # the engine sits above this class's imports

        kwargs = {k: v for k, v in locals().items() if k not in ("self", "engine")}
        return engine.generate(self, **kwargs)

    def generate_stream(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] | None = None,
        page_size: int = 16,
        num_pages: int | None = None,
        logprobs: bool = False,
        max_batch: int = 8,
        prefill_chunk: int = 128,
        cache_dtype: str | None = None,
        preempt: bool = True,
        compiler_options: dict | None = None,
    ):
        """Yields, per engine step, the ``(prompt_index, token_id)`` pairs produced in that
        step, stop tokens included (``(prompt_index, token_id, logprob)`` with
        ``logprobs=True``). Same arguments as ``generate``."""
        from k2jax import engine

        kwargs = {k: v for k, v in locals().items() if k not in ("self", "engine")}
        return engine.generate_stream(self, **kwargs)
