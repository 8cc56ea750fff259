"""``Model``: a config, its params on device, and the jitted entry points users call."""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from k2jax import model as k2model
from k2jax.kernels.platform import target_override
from k2jax.model.config import Config
from k2jax.model.quant import LAYOUTS, PROJECTIONS, layout_of
from k2jax.serving import persistent_engine, placement
from k2jax.serving.options import EngineConfig, GenerateOptions

# Persistent engines a Model keeps (one per engine config and target); the least recently used
# idle one beyond this is closed, freeing its pool.
MAX_ENGINES = 4


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
        self._logits_fns: dict = {}
        self._engines: collections.OrderedDict = collections.OrderedDict()
        self._engines_lock = threading.Lock()

    def persistent_engine(
        self, config: EngineConfig | None = None
    ) -> persistent_engine.PersistentEngine:
        """This model's long-lived engine for ``config``, created and started on first use.

        ``generate`` / ``generate_stream`` and the agent run on it, so its page pool (and the
        prefix cache in it) lives as long as the model. Its bucket programs compile on first
        use (``PersistentEngine(..., warmup=False)``); a server builds its own, warmed up.
        """
        config = config or EngineConfig()
        key = (config, target_override())
        with self._engines_lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = persistent_engine.PersistentEngine(
                    self, config, max_queue=None, warmup=False
                )
                engine.start()
                self._engines[key] = engine
            self._engines.move_to_end(key)
            for old_key in list(self._engines)[:-1]:
                if len(self._engines) <= MAX_ENGINES:
                    break
                old = self._engines[old_key]
                stats = old.stats()
                if stats.running == 0 and stats.queue_length == 0:
                    del self._engines[old_key]
                    old.close()
            return engine

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
        """A host array on this model's devices: copied to every device of the mesh."""
        if self.mesh is None:
            return jnp.asarray(host)
        return placement.place(host, placement.replicated(self.mesh))

    @property
    def _logits_fn(self):
        """The jitted forward for the current target (one per target: a program traced for
        the CPU must not serve ``K2JAX_TARGET=tpu``)."""
        target = target_override()
        if target not in self._logits_fns:
            self._logits_fns[target] = self._build_logits_fn()
        return self._logits_fns[target]

    def _build_logits_fn(self):
        cfg, dtype = self.config, self.dtype

        def run(params, tokens_BT):
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
            x_BTD, _ = k2model.forward(params, tokens_BT, positions_BT, cfg=cfg, dtype=dtype)
            return k2model.lm_logits(params, x_BTD, cfg=cfg, dtype=dtype)

        # Whole logits on every device, so each process (multi-host included) can read them.
        out = None if self.mesh is None else placement.replicated(self.mesh)
        return self._on_mesh(jax.jit(run, out_shardings=out))

    def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """float32 [B, T, V]: a full causal forward pass over equal-length prompts."""
        tokens = as_token_array(token_ids, self.config.vocab_size)
        return np.asarray(self._logits_fn(self.params, self._replicated(tokens)), np.float32)

    def expert_bits_per_weight(self) -> float:
        """Device bytes of the routed experts (payload + scales) * 8 / their weight count."""
        experts = self.params["moe_layers"]["moe"]["experts"]
        weight_cls = LAYOUTS[layout_of(experts)]
        group_size = self.config.quantization.group_size
        layer0 = jnp.int32(0)
        stacks = [weight_cls.from_params(experts, p, group_size, layer0) for p in PROJECTIONS]
        nbytes = sum(w.device_bytes() for w in stacks)
        weights = self.config.num_moe_layers * sum(math.prod(w.shape) for w in stacks)
        return nbytes * 8 / weights

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        options: GenerateOptions | None = None,
        **keywords,
    ) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
        """The new token ids of each prompt (its stop token included), in prompt order.

        Options come as a ``k2jax.serving.options.GenerateOptions``, as flat keywords (its
        ``KEYWORDS``: the sampling fields of ``SamplingParams``, ``stop_token_ids``, and the
        engine knobs of ``EngineConfig``), or both, keywords winning. Sampling follows K2
        Thinking's defaults (temperature 1.0, top_p 1.0; temperature 0 is greedy); prompt i
        draws with seed ``(seed + i) mod 2**32``. ``stop_token_ids=None`` stops at the config's eos
        (``<|im_end|>`` for K2), ``[]`` never stops early. With ``logprobs=True`` returns
        ``(tokens, logprobs)``, the raw logprob of each token.
        """
        return persistent_engine.generate(
            self, prompts, max_new_tokens, GenerateOptions.of(options, **keywords)
        )

    def generate_stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        options: GenerateOptions | None = None,
        **keywords,
    ) -> Iterator[list[tuple]]:
        """Yields, per engine step, the ``(prompt_index, token_id)`` pairs produced in that
        step, stop tokens included (``(prompt_index, token_id, logprob)`` with
        ``logprobs=True``). Same arguments as ``generate``; they are checked at call time.
        Closing the stream early cancels the generation (its pages are let go)."""
        options = GenerateOptions.of(options, **keywords)
        return persistent_engine.generate_stream(self, prompts, max_new_tokens, options)
