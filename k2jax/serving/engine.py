"""The continuous-batching decode engine: its step program and the scheduling both engines share.

Host side, a ``Scheduler`` keeps a fixed number of batch slots, a queue of waiting sequences, a
``PartitionedAllocator`` (one ``PageAllocator`` per pool shard) or a ``StripedAllocator``
(context-parallel: every sequence over every shard) and each sequence's progress;
device side, one jitted step function runs the model over the paged latent cache and samples
the next token of every row. Two engines drive a ``Scheduler``: the batch ``Engine.run`` here
(a fresh pool per call, programs compiled by ``jit`` as shapes appear) and the long-lived
``PersistentEngine`` (``k2jax.serving.persistent_engine``: one pool, programs compiled at
start-up for a fixed set of buckets, requests admitted and retired between steps from a
background thread), which ``Model.generate`` / ``generate_stream`` and the agent run on.

One step feeds every active row the tokens it has not cached yet: a row still prefilling feeds
up to ``prefill_chunk`` of them, a decoding row feeds its last token. The step's token axis is
``prefill_chunk`` when any row is prefilling and 1 otherwise, so a decoding row rides along in a
prefill step (padded) instead of waiting. A row whose fed tokens reach the end of its sequence
emits a token. Attention in a step is [T x S] for the cached positions S of a row, never the
whole prompt's [S x S] at once. With the prefix cache, a sequence starts with the cached pages
of its longest cached prefix and feeds only the rest (at least its last token).

Shapes are bucketed so new prompt lengths do not recompile: the batch axis is the slot count,
the token axis is 1 or ``prefill_chunk``, and the block-table width is the next power of two of
the widest row (at least ``min_context_bucket`` tokens' worth). The page pool and the table of
seen tokens are donated to the step, so XLA updates them in place. The step returns its tokens,
logprobs and top logprobs packed in one int32 array: one device-to-host transfer per step.

When a row needs a page and none is available, the youngest running sequence is preempted: its
pages are let go and it rejoins the front of the queue, to be recomputed from its prompt and the
tokens it already produced. Per-request seeds make the recomputed run draw the same tokens. With
``preempt=False`` the engine raises ``OutOfPages`` instead.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from k2jax import model as k2model
from k2jax.kernels.platform import target_override
from k2jax.model import kv_cache
from k2jax.model.config import Config
from k2jax.model.moe import mesh_axes
from k2jax.serving import placement, sampling
from k2jax.serving.options import EngineConfig, GenerateOptions  # noqa: F401  (re-exported)
from k2jax.serving.page_allocator import (
    OutOfPages,
    PageAllocator,
    PartitionedAllocator,
    RequestTooLarge,
    StripedAllocator,
    pages_for,
)
from k2jax.serving.sampling import MAX_TOP_LOGPROBS, SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to continue. ``stop_token_ids=None`` stops at the config's eos token;
    ``top_logprobs`` (0..20) alternatives are reported with each token."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] | None = None
    top_logprobs: int = 0


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """A token produced for request ``index`` (its position in the list given to ``run``)."""

    index: int
    token: int
    logprob: float | None
    finished: bool
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # "stop" (a stop token) | "length" | None


@dataclasses.dataclass(eq=False)  # compared by identity (queue removal)
class _Sequence:
    key: Hashable  # the allocator's name for it
    request: Request
    stops: frozenset[int]
    sink: Any = None  # who receives its tokens (the persistent engine's consumer)
    generated: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0  # leading tokens whose latents are in the cache
    prefill_end: int = 0  # tokens it held at admission: feeding below this is prefill work
    cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    looked_up: bool = False
    slot: int | None = None
    admitted: int = -1  # admission counter: the largest is the youngest

    @property
    def tokens(self) -> list[int]:
        return [*self.request.prompt, *self.generated]


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def width_bucket(table_pages: int, ec: EngineConfig) -> int:
    """The block-table width of a step whose widest row holds ``table_pages`` pages."""
    floor = pages_for(ec.min_context_bucket, ec.page_size)
    return _next_pow2(max(table_pages, floor))


def width_ladder(max_table_pages: int, ec: EngineConfig) -> list[int]:
    """Every width ``width_bucket`` can give for rows of at most ``max_table_pages`` pages."""
    widths = [width_bucket(1, ec)]
    while widths[-1] < width_bucket(max_table_pages, ec):
        widths.append(widths[-1] * 2)
    return widths


def top_logprobs_width(vocab_size: int) -> int:
    return min(MAX_TOP_LOGPROBS, vocab_size)


@functools.lru_cache(maxsize=16)
def _step_fn(
    cfg: Config,
    dtype: jnp.dtype,
    scan_layers: bool,
    compiler_options=None,
    target=None,
    mesh=None,
    pool_axes: tuple[str, ...] = (),
    device=None,
):
    """The jitted engine step for one model; jit's own cache holds one program per shape.

    Returns ``(pages, seen, out)``, ``out`` int32 [B, 2 + 2k]: the sampled token, its logprob
    (float32 bits), then the top-k ids and their logprobs (float32 bits); see
    ``unpack_step_output``.
    """

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
        top_ids_Bk, top_lps_Bk = sampling.top_logprobs(logits_BV, s)
        old_B = seen_BV[rows_B, tokens_B]
        new_B = jnp.where(emit_B, old_B | sampling.SEEN_IN_OUTPUT, old_B).astype(seen_BV.dtype)
        seen_BV = seen_BV.at[rows_B, tokens_B].set(new_B)

        def bits(x):
            return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)

        out = jnp.concatenate(
            [tokens_B[:, None], bits(logprobs_B)[:, None], top_ids_Bk, bits(top_lps_Bk)], axis=1
        )
        return pages, seen_BV, out

    del target  # a cache key only: the trace reads it through target_platform()
    options = dict(compiler_options) if compiler_options else None
    # On a mesh every output has a declared placement: the seen table and the sampled tokens
    # replicated, so each process (multi-host included) reads them from its own copy, once per
    # step; the pool split as it came in (over ``pool_axes``) and pinned row-major in and out
    # (``placement.row_major``), so the donated pool is updated in place, never copied.
    if mesh is None and (device is None or device.platform != "tpu"):
        return jax.jit(step, donate_argnums=(1, 2), compiler_options=options)
    if mesh is None:
        # One TPU chip: the same pin (measured on a tiny model at batch 8 and 16K positions,
        # XLA:TPU's default pool layout cost 268 MB more read and 70 MB more temporaries a step).
        rest = jax.sharding.SingleDeviceSharding(device)
        pool = placement.row_major(rest, 4)
    else:
        rest, pool = placement.replicated(mesh), pool_sharding(mesh, pool_axes)
    return jax.jit(
        step,
        donate_argnums=(1, 2),
        compiler_options=options,
        in_shardings=(None, pool, *[None] * 8),
        out_shardings=(pool, rest, rest),
    )


def pool_sharding(mesh, pool_axes: tuple[str, ...]):
    """The page pool [L, P, S_page, W] on ``mesh``: pages split over ``pool_axes``, else whole
    on every device; row-major (``placement.row_major``)."""
    spec = jax.sharding.PartitionSpec(None, pool_axes or None)
    return placement.row_major(jax.sharding.NamedSharding(mesh, spec), 4)


def unpack_step_output(out: np.ndarray):
    """(tokens [B], logprobs [B], top ids [B, k], top logprobs [B, k]) from a step's ``out``."""
    out = np.ascontiguousarray(out, np.int32)
    k = (out.shape[1] - 2) // 2
    return (
        out[:, 0],
        out[:, 1].view(np.float32),
        out[:, 2 : 2 + k],
        out[:, 2 + k :].view(np.float32),
    )


@functools.partial(jax.jit, donate_argnums=0)
def _set_row(seen_BV, slot, row_V):
    return seen_BV.at[slot].set(row_V)


class Engine:
    """Runs requests through one model with continuous batching over a paged latent cache.

    ``run`` is the batch form (a fresh pool per call). The pieces both engines need (the params
    in the step's form, the step function, pool creation, validation, the mesh context) live
    here; ``PersistentEngine`` holds one ``Engine`` for them.
    """

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
        # The params' one device (None when they span several): pools are committed there.
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
        # A model placed on a mesh runs its steps under that mesh and its logical-axis rules,
        # as Model.logits does, so the model's sharding hints take effect.
        self.mesh, self.rules = mesh, tuple(rules or ())
        self._step = _step_fn(
            cfg,
            self.dtype,
            scan_layers,
            options,
            target_override(),
            mesh,
            self.pool_axes,
            self._device if mesh is None else None,
        )
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

    @property
    def pool_axes(self) -> tuple[str, ...]:
        """Mesh axes the page pool is split over (the rules' ``kv_pages`` or ``kv_stripes``;
        () when replicated), resolved as the model's attention resolves them
        (``moe.mesh_axes``).

        Data-parallel attention (``kv_pages``): each shard of the batch owns its sequences'
        pages; context-parallel decode (``kv_stripes``): every sequence's pages striped over
        every shard. Either way the slice holds ``pool_shards`` times the tokens of one
        device's share of memory."""
        if self.mesh is None:
            return ()
        with self._context():
            return mesh_axes("kv_pages") or mesh_axes("kv_stripes")

    @property
    def striped(self) -> bool:
        """Whether every sequence is striped over the pool's shards (context-parallel)."""
        if self.mesh is None:
            return False
        with self._context():
            return bool(mesh_axes("kv_stripes"))

    @property
    def pool_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.pool_axes)

    def new_allocator(self, num_pages: int, prefix_cache: bool) -> PageAllocator:
        """Host bookkeeping for a pool of ``num_pages``, in the pool's shards."""
        kind = StripedAllocator if self.striped else PartitionedAllocator
        return kind(num_pages, self.engine_cfg.page_size, prefix_cache, self.pool_shards)

    def slots_for(self, wanted: int) -> int:
        """Batch rows for ``wanted`` sequences: rounded up to whole pool shards when rows own
        a shard each (``max_batch`` 1 over 4 shards runs 4 rows, 3 idle); as wanted when every
        row spans every shard (striped) or the pool is whole."""
        shards = 1 if self.striped else self.pool_shards
        return -(-wanted // shards) * shards

    def shard_pages_for(self, row_pages: Sequence[int], slots: int) -> int:
        """Pages one pool shard needs (its scratch page aside) for the largest ``slots`` of
        these rows' page counts: the rows of a shard's block under a row-partitioned pool,
        every row's share of its stripes under a striped one."""
        need = sorted(row_pages, reverse=True)
        shards = self.pool_shards
        if self.striped:
            return sum(-(-n // shards) for n in need[:slots])
        return sum(need[: slots // shards])

    def page_bytes(self) -> int:
        """Device bytes of one cache page (every layer), per device holding the pool."""
        cfg, ec = self.cfg, self.engine_cfg
        return cfg.num_layers * ec.page_size * cfg.cache_width * self.cache_dtype.itemsize

    def new_state(self, num_pages: int, slots: int):
        """A zeroed page pool [L, P, S_page, W] and seen-token table [slots, V], placed where
        the step's outputs come back (the params' device, or replicated on the mesh), so the
        first call's program is the one every later call reuses."""
        ec, cfg = self.engine_cfg, self.cfg
        pool_shape = (cfg.num_layers, num_pages, ec.page_size, cfg.cache_width)

        def new_pool():
            return kv_cache.empty_pages(*pool_shape, self.cache_dtype)

        seen = np.zeros((slots, cfg.vocab_size), np.int8)
        if self.mesh is not None:
            pages = jax.jit(new_pool, out_shardings=pool_sharding(self.mesh, self.pool_axes))()
            return pages, self._put(seen)
        if self._device is not None and self._device.platform == "tpu":
            # Made in the layout the step pins (a relayout per step otherwise).
            one = jax.sharding.SingleDeviceSharding(self._device)
            pages = jax.jit(new_pool, out_shardings=placement.row_major(one, 4))()
            return pages, jax.device_put(jnp.asarray(seen), one)
        pages, seen = new_pool(), jnp.asarray(seen)
        if self._device is not None:
            device = jax.sharding.SingleDeviceSharding(self._device)
            pages, seen = jax.device_put((pages, seen), device)
        return pages, seen

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
        top = r.top_logprobs
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}"
            )
        if r.stop_token_ids is not None and not all(
            isinstance(t, int | np.integer) and not isinstance(t, bool) for t in r.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be integers, got {list(r.stop_token_ids)!r}")

    def check_fits(self, r: Request, usable: int, name: str = "request") -> None:
        """``RequestTooLarge`` (an ``OutOfPages`` and a ``ValueError``) when ``r`` alone needs
        more than ``usable`` pages (the allocator's ``pages_per_sequence``)."""
        ec = self.engine_cfg
        # The last new token is never fed back, so it needs no cache position.
        need = pages_for(len(r.prompt) + r.max_new_tokens - 1, ec.page_size)
        if r.max_new_tokens and need > usable:
            raise RequestTooLarge(
                f"{name} needs {need} pages of {ec.page_size} tokens ({len(r.prompt)} prompt + "
                f"{r.max_new_tokens} new), but the pool has only {usable} usable pages: "
                "raise num_pages or page_size"
            )

    def sequence(self, key: Hashable, r: Request, sink: Any = None) -> _Sequence:
        eos = () if self.cfg.eos_token_id is None else (self.cfg.eos_token_id,)
        stops = frozenset(eos if r.stop_token_ids is None else r.stop_token_ids)
        return _Sequence(key, r, stops, sink)

    def _pool_pages(self, requests: Sequence[Request], slots: int) -> int:
        if self.engine_cfg.num_pages is not None:
            return self.engine_cfg.num_pages
        need = [
            pages_for(len(r.prompt) + r.max_new_tokens, self.engine_cfg.page_size) for r in requests
        ]
        # A power of two, so a new prompt length rarely changes the pool's shape (a recompile).
        # Each shard is sized for the largest rows it may hold.
        return self.pool_shards * _next_pow2(1 + self.shard_pages_for(need, slots))

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
        slots = self.slots_for(min(ec.max_batch, _next_pow2(len(live))))
        alloc = self.new_allocator(self._pool_pages(live, slots), ec.prefix_cache)
        for i, r in enumerate(requests):
            self.check_fits(r, alloc.pages_per_sequence, f"request {i}")
        scheduler = Scheduler(self, slots, alloc, lambda chunk, width: self._step)
        for i, r in enumerate(requests):
            if r.max_new_tokens > 0:
                scheduler.add(self.sequence(i, r))
        while scheduler.has_work():
            produced = scheduler.step()
            if produced:
                yield [event for _, event in produced]


class Scheduler:
    """One pool's slots, queue and pages, stepped by an engine between its admissions.

    ``program(chunk, width)`` gives the step program for a token axis and block-table width.
    ``step`` admits waiting sequences into free slots, grows tables (preempting the youngest
    when the pool runs out), runs one program, reads its output once, and retires finished
    sequences; it returns each emitted ``(sequence, TokenEvent)``.
    """

    def __init__(
        self,
        engine: Engine,
        slots: int,
        alloc: PartitionedAllocator | StripedAllocator,
        program: Callable[[int, int], Callable],
    ):
        self.engine, self.slots, self.alloc = engine, slots, alloc
        self._program = program
        self.pages, self.seen = engine.new_state(alloc.num_pages, slots)
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.running: list[_Sequence | None] = [None] * slots
        self._admissions = 0
        # Cumulative counters (prompt tokens).
        self.prefill_tokens_computed = 0
        self.prefix_hit_tokens = 0
        self.prefix_lookup_tokens = 0

    def add(self, seq: _Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.running)

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self.running)

    def drop(self, seq: _Sequence) -> None:
        """Forget ``seq`` (cancelled): out of the queue or its slot, its pages let go."""
        if seq.slot is not None:
            self.running[seq.slot] = None
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.alloc.free(seq.key)

    def _admit(self) -> None:
        """Admit waiting sequences into free slots while their whole prefill fits."""
        ec, alloc = self.engine.engine_cfg, self.alloc
        for slot in range(self.slots):
            if self.running[slot] is not None or not self.waiting:
                continue
            seq = self.waiting[0]
            tokens = seq.tokens
            shard = alloc.shard_of_slot(slot, self.slots)
            hits, digests = alloc.cached_prefix(tokens, shard)
            if not alloc.fits(hits, len(tokens), shard):
                continue  # another slot's pool shard may have room
            self.waiting.popleft()
            alloc.start(seq.key, hits, digests, shard)
            seq.cached, seq.prefill_end = len(hits) * ec.page_size, len(tokens)
            if not seq.generated:
                seq.cached_tokens = seq.cached
            if not seq.looked_up:
                seq.looked_up = True
                self.prefix_lookup_tokens += len(seq.request.prompt)
                self.prefix_hit_tokens += seq.cached
            seq.slot, seq.admitted = slot, self._admissions
            self._admissions += 1
            self.running[slot] = seq
            row = np.zeros((self.engine.cfg.vocab_size,), np.int8)
            row[list(seq.request.prompt)] = sampling.SEEN_IN_PROMPT
            row[seq.generated] |= sampling.SEEN_IN_OUTPUT
            self.seen = _set_row(self.seen, *self.engine._put((np.int32(slot), row)))

    def _preempt(self, victim: _Sequence) -> None:
        ec, alloc = self.engine.engine_cfg, self.alloc
        if not ec.preempt:
            raise OutOfPages(
                f"the page pool ({alloc.num_usable} usable pages of {ec.page_size} "
                "tokens) is exhausted and preemption is disabled: raise num_pages, lower "
                "max_batch, or enable preemption"
            )
        alloc.free(victim.key)
        self.running[victim.slot] = None
        victim.slot, victim.cached = None, 0
        self.waiting.appendleft(victim)
        self.engine.num_preemptions += 1

    def step(self) -> list[tuple[_Sequence, TokenEvent]]:
        engine, alloc = self.engine, self.alloc
        ec = engine.engine_cfg
        self._admit()
        active = [s for s in self.running if s is not None]
        if not active:
            return []
        tokens_of = {id(s): s.tokens for s in active}
        prefilling = any(len(tokens_of[id(s)]) - s.cached > 1 for s in active)
        chunk = ec.prefill_chunk if prefilling else 1
        # Oldest first: they get pages before the youngest is considered for preemption.
        for seq in sorted(active, key=lambda s: s.admitted):
            if seq.slot is None:
                continue
            feed = min(chunk, len(tokens_of[id(seq)]) - seq.cached)
            while True:
                try:
                    alloc.ensure(seq.key, seq.cached + feed)
                    break
                except OutOfPages:
                    shard = alloc.shard(seq.key)  # only its own shard's pages can help
                    others = [
                        s for s in self.running if s is not None and alloc.shard(s.key) == shard
                    ]
                    victim = max(others, key=lambda s: s.admitted)
                    if victim is seq and len(others) == 1:
                        raise  # cannot happen for a validated request; kept as a guard
                    self._preempt(victim)
                    if victim is seq:
                        break
        active = [s for s in self.running if s is not None]
        if not active:
            return []

        slots = self.slots
        width = width_bucket(max(len(alloc.pages(s.key)) for s in active), ec)
        tokens = np.zeros((slots, chunk), np.int32)
        positions = np.full((slots, chunk), -1, np.int32)
        tables = np.zeros((slots, width), np.int32)
        last = np.zeros((slots,), np.int32)
        emit = np.zeros((slots,), bool)
        step = np.zeros((slots,), np.int32)
        params_rows = [SamplingParams(temperature=0.0)] * slots
        top_rows = [0] * slots
        for seq in active:
            b, toks = seq.slot, tokens_of[id(seq)]
            feed = min(chunk, len(toks) - seq.cached)
            tokens[b, :feed] = toks[seq.cached : seq.cached + feed]
            positions[b, :feed] = np.arange(seq.cached, seq.cached + feed)
            tables[b] = alloc.block_table(seq.key, width)
            last[b] = feed - 1
            emit[b] = seq.cached + feed == len(toks)
            step[b] = len(seq.generated)
            params_rows[b] = seq.request.sampling
            top_rows[b] = seq.request.top_logprobs
            self.prefill_tokens_computed += max(
                0, min(seq.cached + feed, seq.prefill_end) - seq.cached
            )
            seq.cached += feed
        with engine._context():
            inputs = (tokens, positions, tables, last, emit, step)
            batch_sampling = sampling.BatchSampling.from_params(params_rows, top_rows)
            program = self._program(chunk, width)
            self.pages, self.seen, out = program(
                engine.params, self.pages, self.seen, *engine._put((*inputs, batch_sampling))
            )
        # The one device-to-host transfer of the step.
        next_B, logprobs_B, top_ids_Bk, top_lps_Bk = unpack_step_output(np.asarray(out))

        produced = []
        for seq in active:
            if alloc.cache is not None:
                alloc.name_full_pages(seq.key, tokens_of[id(seq)], seq.cached)
            b = seq.slot
            if not emit[b]:
                continue
            token = int(next_B[b])
            seq.generated.append(token)
            r = seq.request
            stopped = token in seq.stops
            done = stopped or len(seq.generated) >= r.max_new_tokens
            lp = float(logprobs_B[b]) if r.sampling.logprobs else None
            k = r.top_logprobs
            top = tuple(
                (int(i), float(v))
                for i, v in zip(top_ids_Bk[b, :k], top_lps_Bk[b, :k], strict=True)
            )
            reason = ("stop" if stopped else "length") if done else None
            produced.append((seq, TokenEvent(seq.key, token, lp, done, top, reason)))
            if done:
                alloc.free(seq.key)
                self.running[b] = None
                seq.slot = None
        return produced
