"""Token sampling on device, for a batch whose rows each carry their own settings and seed.

Per row, in this order (transformers' order of logits processors and warpers):

1. repetition penalty over tokens seen in the prompt or the output (a positive logit is divided
   by it, a negative one multiplied), then presence penalty (subtracted once from every token
   already in the output);
2. temperature (0 means greedy: the argmax of the penalized logits);
3. top-k, then top-p over the renormalized survivors, then min-p (drop tokens whose probability
   is below ``min_p`` times the most likely token's);
4. a Gumbel-max draw over the survivors.

Randomness is per request, not per batch: row b draws with ``fold_in(key(seed_b), step_b)``,
``step_b`` being how many tokens that request has generated. The same seed therefore gives the
same tokens whatever else shares the batch, and a preempted request that is recomputed draws the
same tokens again.

Logprobs are those of the chosen token under the model's raw distribution (log-softmax of the
logits, before penalties, temperature and truncation), as OpenAI-style APIs report them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# Bit flags in the per-row ``seen`` table [B, V] (int8): which tokens the penalties apply to.
SEEN_IN_PROMPT = 1
SEEN_IN_OUTPUT = 2


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; validated on construction.

    Defaults follow Kimi K2 Thinking's recommendation (temperature 1.0, top_p 1.0).
    ``top_k=None`` disables top-k; ``temperature=0`` is greedy decoding.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    seed: int = 0
    logprobs: bool = False

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{field} = {getattr(self, field)!r}: {why}")

        if not _is_real(self.temperature) or not self.temperature >= 0:
            fail("temperature", "must be a finite number >= 0 (0 means greedy)")
        if self.top_k is not None and (
            not isinstance(self.top_k, int | np.integer) or isinstance(self.top_k, bool)
        ):
            fail("top_k", "must be a positive integer or None (disabled)")
        if self.top_k is not None and self.top_k < 1:
            fail("top_k", "must be >= 1, or None to disable top-k")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "must lie in (0, 1]")
        if not _is_real(self.min_p) or not 0 <= self.min_p < 1:
            fail("min_p", "must lie in [0, 1)")
        if not _is_real(self.repetition_penalty) or not self.repetition_penalty > 0:
            fail("repetition_penalty", "must be a finite number > 0 (1.0 disables it)")
        if not _is_real(self.presence_penalty):
            fail("presence_penalty", "must be a finite number (0.0 disables it)")
        if not isinstance(self.seed, int | np.integer) or isinstance(self.seed, bool):
            fail("seed", "must be an integer")
        if not 0 <= self.seed < 2**32:
            fail("seed", "must lie in [0, 2**32)")


def _is_real(x) -> bool:
    return (
        isinstance(x, int | float | np.integer | np.floating)
        and not isinstance(x, bool)
        and math.isfinite(x)
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchSampling:
    """``SamplingParams`` of every row as device arrays [B]; top_k 0 means disabled."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    seed: jax.Array
    top_logprobs: jax.Array  # alternatives each row reports (0: skip the top-k of the step)

    @classmethod
    def from_params(
        cls, rows: list[SamplingParams], top_logprobs: list[int] | None = None
    ) -> BatchSampling:
        """Host arrays for ``rows`` (idle batch slots pass the defaults)."""
        top = [0] * len(rows) if top_logprobs is None else top_logprobs
        return cls(
            temperature=np.array([r.temperature for r in rows], np.float32),
            top_k=np.array([r.top_k or 0 for r in rows], np.int32),
            top_p=np.array([r.top_p for r in rows], np.float32),
            min_p=np.array([r.min_p for r in rows], np.float32),
            repetition_penalty=np.array([r.repetition_penalty for r in rows], np.float32),
            presence_penalty=np.array([r.presence_penalty for r in rows], np.float32),
            seed=np.array([r.seed for r in rows], np.uint32),
            top_logprobs=np.array(top, np.int32),
        )


def apply_penalties(logits_BV: jax.Array, seen_BV: jax.Array, s: BatchSampling) -> jax.Array:
    """Repetition penalty on prompt and output tokens, presence penalty on output tokens."""
    rep_B1 = s.repetition_penalty[:, None]
    penalized_BV = jnp.where(logits_BV > 0, logits_BV / rep_B1, logits_BV * rep_B1)
    logits_BV = jnp.where(seen_BV != 0, penalized_BV, logits_BV)
    in_output_BV = (seen_BV & SEEN_IN_OUTPUT) != 0
    return logits_BV - jnp.where(in_output_BV, s.presence_penalty[:, None], 0.0)


def truncation_mask(scaled_BV: jax.Array, s: BatchSampling) -> jax.Array:
    """bool [B, V]: the tokens top-k, top-p and min-p keep, from temperature-scaled logits."""
    vocab = scaled_BV.shape[-1]
    top_k_B = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)

    def with_sort(scaled_BV):
        # Thresholds come from the sorted row and are compared in vocab order, which avoids
        # scattering a sorted mask back through the permutation.
        sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
        rank_V = jnp.arange(vocab)
        in_top_k_BV = rank_V[None, :] < top_k_B[:, None]
        kth_B = jnp.take_along_axis(sorted_BV, top_k_B[:, None] - 1, axis=1)[:, 0]
        probs_BV = jax.nn.softmax(jnp.where(in_top_k_BV, sorted_BV, -jnp.inf), axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        # A token survives top-p when the mass strictly before it is below top_p; the first
        # token always survives.
        keep_sorted_BV = in_top_k_BV & ((before_BV < s.top_p[:, None]) | (rank_V[None, :] == 0))
        last_B = jnp.sum(keep_sorted_BV, axis=-1) - 1
        cutoff_B = jnp.take_along_axis(sorted_BV, last_B[:, None], axis=1)[:, 0]
        return scaled_BV >= jnp.maximum(kth_B, cutoff_B)[:, None]

    needs_sort = jnp.any((top_k_B < vocab) | (s.top_p < 1.0))
    keep_BV = jax.lax.cond(needs_sort, with_sort, lambda x: jnp.ones(x.shape, bool), scaled_BV)
    max_B1 = jnp.max(scaled_BV, axis=-1, keepdims=True)
    # p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p); min_p = 0 gives -inf (keep all).
    min_p_B1 = jnp.log(s.min_p)[:, None]
    return keep_BV & (scaled_BV >= max_B1 + min_p_B1)


def sample(
    logits_BV: jax.Array,
    seen_BV: jax.Array,
    step_B: jax.Array,
    s: BatchSampling,
) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row: (tokens int32 [B], their raw logprobs float32 [B]).

    ``seen_BV`` is the int8 table of ``SEEN_IN_PROMPT`` / ``SEEN_IN_OUTPUT`` flags; ``step_B``
    is how many tokens each row's request has generated so far (its draw index).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    penalized_BV = apply_penalties(logits_BV, seen_BV, s)
    greedy_B = jnp.argmax(penalized_BV, axis=-1).astype(jnp.int32)
    temperature_B1 = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    scaled_BV = penalized_BV / temperature_B1
    keep_BV = truncation_mask(scaled_BV, s)

    def noise(seed, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.gumbel(key, (logits_BV.shape[-1],), jnp.float32)

    gumbel_BV = jax.vmap(noise)(s.seed, step_B)
    drawn_B = jnp.argmax(jnp.where(keep_BV, scaled_BV + gumbel_BV, -jnp.inf), axis=-1)
    tokens_B = jnp.where(s.temperature > 0, drawn_B.astype(jnp.int32), greedy_B)
    logprobs_B = jnp.take_along_axis(
        jax.nn.log_softmax(logits_BV, axis=-1), tokens_B[:, None], axis=1
    )[:, 0]
    return tokens_B, logprobs_B


MAX_TOP_LOGPROBS = 20


def top_logprobs(logits_BV: jax.Array, s: BatchSampling) -> tuple[jax.Array, jax.Array]:
    """The ``k = min(MAX_TOP_LOGPROBS, V)`` most likely tokens of each row under the raw
    distribution: (ids int32 [B, k], logprobs float32 [B, k]), most likely first.

    Computed only when some row asks for alternatives (a ``lax.cond``); otherwise zeros, so a
    step's shape never depends on the requests.
    """
    k = min(MAX_TOP_LOGPROBS, logits_BV.shape[-1])

    def top(logits_BV):
        values_Bk, ids_Bk = jax.lax.top_k(jax.nn.log_softmax(logits_BV, axis=-1), k)
        return ids_Bk.astype(jnp.int32), values_Bk

    def skip(logits_BV):
        b = logits_BV.shape[0]
        return jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32)

    return jax.lax.cond(jnp.any(s.top_logprobs > 0), top, skip, logits_BV.astype(jnp.float32))
