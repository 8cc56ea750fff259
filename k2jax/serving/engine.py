"""The continuous-batching decode engine: requests in, tokens out as they are produced.

Host side, the engine keeps a fixed number of batch slots, a queue of waiting requests, a
``PageAllocator`` and each sequence's progress; device side, one jitted step function runs the
model over the paged latent cache and samples the next token of every row.

One step feeds every active row the tokens it has not cached yet: a row still prefilling feeds
up to ``prefill_chunk`` of them, a decoding row feeds its last token. The step's token axis is
``prefill_chunk`` when any row is prefilling and 1 otherwise, so a decoding row rides along in a
prefill step (padded) instead of waiting. A row whose fed tokens reach the end of its sequence
emits a token. Attention in a step is [T x S] for the cached positions S of a row, never the
whole prompt's [S x S] at once.

Shapes are bucketed so new prompt lengths do not recompile: the batch axis is the slot count,
the token axis is 1 or ``prefill_chunk``, and the block-table width is the next power of two of
the widest row (at least ``min_context_bucket`` tokens' worth). The page pool and the table of
seen tokens are donated to the step, so XLA updates them in place.

When a row needs a page and none is free, the youngest running sequence is preempted: its pages
go back to the free list and it rejoins the front of the queue, to be recomputed from its prompt
and the tokens it already produced. Per-request seeds make the recomputed run draw the same
tokens. With ``preempt=False`` the engine raises ``OutOfPages`` instead.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from k2jax import model as k2model
from k2jax.kernels.platform import target_override
from k2jax.model import kv_cache
from k2jax.model.config import Config
from k2jax.serving import placement, sampling
from k2jax.serving.options import EngineConfig, GenerateOptions
from k2jax.serving.page_allocator import OutOfPages, PageAllocator, pages_for
from k2jax.serving.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to continue. ``stop_token_ids=None`` stops at the config's eos token."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """A token produced for request ``index`` (its position in the list given to ``run``)."""

    index: int
    token: int
    logprob: float | None
    finished: bool


@dataclasses.dataclass
class _Sequence:
    index: int
    request: Request
    stops: frozenset[int]
    generated: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0  # leading tokens whose latents are in the cache
    slot: int | None = None
    admitted: int = -1  # admission counter: the largest is the youngest

    @property
    def tokens(self) -> list[int]:
        return [*self.request.prompt, *self.generated]


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=16)
def _step_fn(
    cfg: Config,
    dtype: jnp.dtype,
    scan_layers: bool,
    compiler_options=None,
    target=None,
    mesh=None,
):
    """The jitted engine step for one model; jit's own cache holds one program per shape."""

    def step(params, pages, seen_BV, tokens_BT, positions_BT, tables_BP, last_B, emit_B, step_B, s):
        cache = kv_cache.PagedCache(pages, tables_BP)
        x_BTD, pages = k2model.forward(
            params, tokens_BT, positions_BT, cache, cfg=cfg, dtype=dtype, scan_layers=scan_layers
        )
        rows_B = jnp.arange(tokens_BT.shape[0])
        # Only each row's last fed token needs the [D, V] head: a chunk never builds [T, V].
        x_B1D = x_BTD[rows_B, last_B][:, None]
        logits_BV = k2model.lm_logits(params, x_B1D, cfg=cfg, dtype=dtype)[:, 0]
        tokens_B, logprobs_B = sampling.sample(logits_BV, seen_BV, step_B, s)
        old_B = seen_BV[rows_B, tokens_B]
        new_B = jnp.where(emit_B, old_B | sampling.SEEN_IN_OUTPUT, old_B).astype(seen_BV.dtype)
        seen_BV = seen_BV.at[rows_B, tokens_B].set(new_B)
        return pages, seen_BV, tokens_B, logprobs_B

    del target  # a cache key only: the trace reads it through target_platform()
    options = dict(compiler_options) if compiler_options else None
    # On a mesh every output has a declared placement: replicated, so each process (multi-host
    # included) reads the sampled tokens from its own copy, once per step.
    out = None if mesh is None else placement.replicated(mesh)
    return jax.jit(step, donate_argnums=(1, 2), compiler_options=options, out_shardings=out)


@functools.partial(jax.jit, donate_argnums=0)
def _set_row(seen_BV, slot, row_V):
    return seen_BV.at[slot].set(row_V)


class Engine:
    """Runs requests through one model with continuous batching over a paged latent cache."""

    def __init__(
        self,
        cfg: Config,
        params: dict,
        dtype=jnp.bfloat16,
        engine_cfg: EngineConfig | None = None,
        *,
        scan_layers: bool = True,
        mesh=None,
        rules=(),
    ):
        self.cfg = cfg
        devices = {d for leaf in jax.tree.leaves(params) for d in leaf.devices()}
        # The params' one device (None when they span several): run() commits its pool there.
        self._device = devices.pop() if len(devices) == 1 else None
        # On one CPU device the layers run unrolled over per-layer views of the stacks, so no
        # step copies weights out of a stack (see k2jax.model.unstack_layers).
        on_one_cpu = (
            mesh is None
            and self._device is not None
            and self._device.platform == "cpu"
            and target_override() in (None, "cpu")
        )
        self.params = k2model.unstack_layers(params) if on_one_cpu else params
        self.dtype = jnp.dtype(dtype)
        self.engine_cfg = engine_cfg or EngineConfig()
        if self.engine_cfg.cache_dtype is not None:
            self.cache_dtype = jnp.dtype(self.engine_cfg.cache_dtype)
        elif self.dtype == jnp.float32:
            self.cache_dtype = jnp.dtype(jnp.float32)  # exact parity runs keep the cache exact
        else:
            self.cache_dtype = jnp.dtype(jnp.bfloat16)
        options = self.engine_cfg.compiler_options
        # The target is part of the key: a step traced for the CPU must not serve a TPU target.
        self._step = _step_fn(cfg, self.dtype, scan_layers, options, target_override(), mesh)
        # A model placed on a mesh runs its steps under that mesh and its logical-axis rules,
        # as Model.logits does, so the model's sharding hints take effect.
        self.mesh, self.rules = mesh, tuple(rules or ())
        self.num_preemptions = 0

    def _put(self, tree):
        """Host arrays as the step's inputs: replicated on a mesh, else as they are."""
        return tree if self.mesh is None else placement.place_replicated(tree, self.mesh)

    def _context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def validate(self, r: Request) -> None:
        """ValueError naming what is wrong with request ``r`` for this model."""
        if not r.prompt:
            raise ValueError("a prompt must hold at least one token")
        lo, hi = min(r.prompt), max(r.prompt)
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(
                f"prompt token ids must lie in [0, {self.cfg.vocab_size}), got [{lo}, {hi}]"
            )
        if not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {r.max_new_tokens!r}")
        total = len(r.prompt) + r.max_new_tokens
        if total > self.cfg.max_position_embeddings:
            raise ValueError(
                f"prompt ({len(r.prompt)} tokens) + max_new_tokens ({r.max_new_tokens}) exceeds "
                f"the model's max_position_embeddings ({self.cfg.max_position_embeddings})"
            )

    def _pool_pages(self, requests: Sequence[Request], slots: int) -> int:
        if self.engine_cfg.num_pages is not None:
            return self.engine_cfg.num_pages
        need = sorted(
            (
                pages_for(len(r.prompt) + r.max_new_tokens, self.engine_cfg.page_size)
                for r in requests
            ),
            reverse=True,
        )
        # A power of two, so a new prompt length rarely changes the pool's shape (a recompile).
        return _next_pow2(1 + sum(need[:slots]))

    def run(self, requests: Sequence[Request]) -> Iterator[list[TokenEvent]]:
        """Generate for every request; yields, per engine step, the tokens that step produced.

        A request's stop token is included in its output; a request stops there or after
        ``max_new_tokens``. Raises ``OutOfPages`` (before any work) when a request alone cannot
        fit in the pool, and during the run when preemption is disabled and the pool runs out.
        """
        ec = self.engine_cfg
        for r in requests:
            self.validate(r)
        live = [r for r in requests if r.max_new_tokens > 0]
        if not live:
            return
        slots = min(ec.max_batch, _next_pow2(len(live)))
        alloc = PageAllocator(self._pool_pages(live, slots), ec.page_size)
        for i, r in enumerate(requests):
            # The last new token is never fed back, so it needs no cache position.
            need = len(r.prompt) + r.max_new_tokens - 1
            if r.max_new_tokens and pages_for(need, ec.page_size) > alloc.num_pages - 1:
                raise OutOfPages(
                    f"request {i} needs {pages_for(need, ec.page_size)} pages of {ec.page_size} "
                    f"tokens ({len(r.prompt)} prompt + {r.max_new_tokens} new), but the pool has "
                    f"only {alloc.num_pages - 1} usable pages: raise num_pages or page_size"
                )
        eos = () if self.cfg.eos_token_id is None else (self.cfg.eos_token_id,)
        waiting = collections.deque(
            _Sequence(i, r, frozenset(eos if r.stop_token_ids is None else r.stop_token_ids))
            for i, r in enumerate(requests)
            if r.max_new_tokens > 0
        )
        running: list[_Sequence | None] = [None] * slots
        pool_shape = (self.cfg.num_layers, alloc.num_pages, ec.page_size, self.cfg.cache_width)

        def new_pool():
            return kv_cache.empty_pages(*pool_shape, self.cache_dtype)

        seen = np.zeros((slots, self.cfg.vocab_size), np.int8)
        # Step outputs come back committed to the params' device (or replicated on the mesh);
        # placing the fresh pool and table alike keeps the first call's program the one every
        # later call reuses.
        if self.mesh is not None:
            pages = jax.jit(new_pool, out_shardings=placement.replicated(self.mesh))()
            seen = self._put(seen)
        else:
            pages, seen = new_pool(), jnp.asarray(seen)
            if self._device is not None:
                device = jax.sharding.SingleDeviceSharding(self._device)
                pages, seen = jax.device_put((pages, seen), device)
        admissions = 0

        def preempt(victim: _Sequence) -> None:
            if not ec.preempt:
                raise OutOfPages(
                    f"the page pool ({alloc.num_pages - 1} usable pages of {ec.page_size} "
                    "tokens) is exhausted and preemption is disabled: raise num_pages, lower "
                    "max_batch, or enable preemption"
                )
            alloc.free(victim.index)
            running[victim.slot] = None
            victim.slot, victim.cached = None, 0
            waiting.appendleft(victim)
            self.num_preemptions += 1

        while waiting or any(running):
            # Admit waiting sequences into free slots while their whole prefill fits.
            for slot in range(slots):
                if running[slot] is not None or not waiting:
                    continue
                seq = waiting[0]
                if alloc.needed(seq.index, len(seq.tokens)) > alloc.num_free:
                    break
                waiting.popleft()
                seq.slot, seq.admitted = slot, admissions
                admissions += 1
                running[slot] = seq
                row = np.zeros((self.cfg.vocab_size,), np.int8)
                row[list(seq.request.prompt)] = sampling.SEEN_IN_PROMPT
                row[seq.generated] |= sampling.SEEN_IN_OUTPUT
                seen = _set_row(seen, *self._put((np.int32(slot), row)))

            active = [s for s in running if s is not None]
            chunk = ec.prefill_chunk if any(len(s.tokens) - s.cached > 1 for s in active) else 1
            # Oldest first: they get pages before the youngest is considered for preemption.
            for seq in sorted(active, key=lambda s: s.admitted):
                if seq.slot is None:
                    continue
                feed = min(chunk, len(seq.tokens) - seq.cached)
                while True:
                    try:
                        alloc.ensure(seq.index, seq.cached + feed)
                        break
                    except OutOfPages:
                        others = [s for s in running if s is not None]
                        victim = max(others, key=lambda s: s.admitted)
                        if victim is seq and len(others) == 1:
                            raise  # cannot happen for a validated request; kept as a guard
                        preempt(victim)
                        if victim is seq:
                            break
            active = [s for s in running if s is not None]
            if not active:
                continue

            width_tokens = max(len(alloc.pages(s.index)) for s in active) * ec.page_size
            width = pages_for(max(width_tokens, ec.min_context_bucket), ec.page_size)
            width = _next_pow2(width)
            tokens = np.zeros((slots, chunk), np.int32)
            positions = np.full((slots, chunk), -1, np.int32)
            tables = np.zeros((slots, width), np.int32)
            last = np.zeros((slots,), np.int32)
            emit = np.zeros((slots,), bool)
            step = np.zeros((slots,), np.int32)
            params_rows = [SamplingParams(temperature=0.0)] * slots
            for seq in active:
                b, toks = seq.slot, seq.tokens
                feed = min(chunk, len(toks) - seq.cached)
                tokens[b, :feed] = toks[seq.cached : seq.cached + feed]
                positions[b, :feed] = np.arange(seq.cached, seq.cached + feed)
                tables[b] = alloc.block_table(seq.index, width)
                last[b] = feed - 1
                emit[b] = seq.cached + feed == len(toks)
                step[b] = len(seq.generated)
                params_rows[b] = seq.request.sampling
                seq.cached += feed
            with self._context():
                inputs = (tokens, positions, tables, last, emit, step)
                batch_sampling = sampling.BatchSampling.from_params(params_rows)
                pages, seen, next_B, logprobs_B = self._step(
                    self.params, pages, seen, *self._put((*inputs, batch_sampling))
                )
            next_B, logprobs_B = np.asarray(next_B), np.asarray(logprobs_B)

            events = []
            for seq in active:
                b = seq.slot
                if not emit[b]:
                    continue
                token = int(next_B[b])
                seq.generated.append(token)
                done = token in seq.stops or len(seq.generated) >= seq.request.max_new_tokens
                lp = float(logprobs_B[b]) if seq.request.sampling.logprobs else None
                events.append(TokenEvent(seq.index, token, lp, done))
                if done:
                    alloc.free(seq.index)
                    running[b] = None
            if events:
                yield events


def _requests(model, prompts, max_new_tokens, options: GenerateOptions) -> list[Request]:
    if isinstance(prompts, np.ndarray | jax.Array):
        prompts = np.asarray(prompts).tolist()
    if not isinstance(prompts, Sequence) or isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if not all(isinstance(p, Sequence | np.ndarray) and not isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of token-id lists, e.g. [[1, 2, 3]]")
    for i, p in enumerate(prompts):
        for t in p:
            if not _is_token_id(t):
                raise ValueError(
                    f"prompt {i}: token ids must be integers, got {t!r} ({type(t).__name__})"
                )
    return [
        Request(
            prompt=tuple(int(t) for t in p),
            max_new_tokens=max_new_tokens,
            sampling=options.sampling_for(i),
            stop_token_ids=options.stop_token_ids,
        )
        for i, p in enumerate(prompts)
    ]


def _is_token_id(t) -> bool:
    return isinstance(t, int | np.integer) and not isinstance(t, bool | np.bool_)


def _engine(model, options: GenerateOptions) -> Engine:
    return Engine(
        model.config,
        model.params,
        model.dtype,
        options.engine,
        mesh=getattr(model, "mesh", None),
        rules=getattr(model, "rules", ()),
    )


def generate_stream(model, prompts, max_new_tokens, options: GenerateOptions):
    """``Model.generate_stream``: per-step lists of (prompt_index, token[, logprob]).

    Prompts and options are checked here, at call time, not at the first iteration."""
    requests = _requests(model, prompts, max_new_tokens, options)
    engine = _engine(model, options)
    for r in requests:
        engine.validate(r)
    with_logprobs = options.sampling.logprobs

    def stream():
        for events in engine.run(requests):
            if with_logprobs:
                yield [(e.index, e.token, e.logprob) for e in events]
            else:
                yield [(e.index, e.token) for e in events]

    return stream()


def generate(model, prompts, max_new_tokens, options: GenerateOptions):
    """``Model.generate``: the new tokens of every prompt (and their logprobs on request)."""
    with_logprobs = options.sampling.logprobs
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_new_tokens, options):
        for index, token, *lp in step:
            tokens[index].append(token)
            if with_logprobs:
                logprobs[index].append(lp[0])
    return (tokens, logprobs) if with_logprobs else tokens
