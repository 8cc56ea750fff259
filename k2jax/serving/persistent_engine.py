"""The persistent engine: one long-lived engine per model, fed by any number of threads.

``PersistentEngine`` allocates its page pool once and compiles its step programs at start-up
for a fixed set of buckets: batch = ``max_batch`` slots, token axis 1 or ``prefill_chunk``,
block-table widths the power-of-two ladder from ``min_context_bucket`` up to the longest table a
request can hold (the context, or the pool). No prompt length compiles anything after that;
``compile_count`` counts the compilations. Requests are admitted and retired between steps by a
background thread that runs while there is work (online continuous batching); a cancelled
request's pages are let go at the next step boundary. Each step reads its tokens, logprobs and
top logprobs back in one device-to-host transfer. With the prefix cache (default) a prompt that
starts with cached pages prefills only the rest (``k2jax.serving.prefix_cache``).

The scheduling and the step program are ``k2jax.serving.engine``'s (``Scheduler``,
``_step_fn``), shared with the batch ``Engine.run``. ``Model.generate`` / ``generate_stream``
(``generate`` / ``generate_stream`` below) and the agent run on the model's own persistent
engine (``Model.persistent_engine``). The contract the HTTP server codes against is
/work/helpers/ENGINE_API.md's; docs/engine.md explains the rest.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from k2jax.kernels.platform import target, target_override
from k2jax.serving import sampling
from k2jax.serving.engine import (
    Engine,
    Request,
    Scheduler,
    _next_pow2,
    _Sequence,
    _set_row,
    width_ladder,
)
from k2jax.serving.lockstep import Boundary, Channel
from k2jax.serving.options import EngineConfig, GenerateOptions
from k2jax.serving.page_allocator import OutOfPages, pages_for
from k2jax.serving.sampling import SamplingParams

if TYPE_CHECKING:
    from k2jax.serving.loaded_model import Model

EngineRequest = Request  # prompt, max_new_tokens, sampling, stop_token_ids, top_logprobs

# Pool sizing when EngineConfig.num_pages is None (docs/engine.md).
POOL_MEMORY_FRACTION = 0.8  # of the device memory left after the weights, where reported
DEFAULT_POOL_TOKENS = 1 << 17  # otherwise at most this many tokens' pages
MAX_CONTEXTS_IN_POOL = 4  # never more pages than max_batch * this many whole contexts


class QueueFull(RuntimeError):
    """``submit`` found the bounded queue full (a server answers 429)."""


@dataclasses.dataclass(frozen=True)
class StepToken:
    """One token of a request, as the engine produced it."""

    token: int
    logprob: float | None  # when sampling.logprobs
    top_logprobs: tuple[tuple[int, float], ...]  # len == request.top_logprobs
    finished: bool
    finish_reason: str | None  # "stop" (stop token) | "length" | None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    queue_length: int
    running: int
    num_pages: int  # usable pages (page 0, the scratch page, excluded)
    pages_used: int  # held by a request
    pages_cached: int  # idle, kept for the prefix cache, evictable
    prefix_hit_tokens: int  # cumulative prompt tokens served from the prefix cache
    prefix_lookup_tokens: int  # cumulative prompt tokens looked up
    prefill_tokens_computed: int  # cumulative tokens prefilled (prompt or recomputation)
    num_preemptions: int = 0
    compile_count: int = 0


_END = object()  # a sink's last item: nothing more comes


class _Sink:
    """A consumer's queue: per-step lists of ``(index, StepToken)``, an error, or ``_END``."""

    def __init__(self, size: int):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.sequences: list[_Sequence] = []
        self.live = size  # requests not finished yet (engine side)

    def put(self, item) -> None:
        self.queue.put(item)


class RequestHandle:
    """The consumer's end of one request: iterate it (blocking) or ``get`` one token."""

    def __init__(self, engine: PersistentEngine, request: EngineRequest):
        self.request = request
        self.prompt_tokens = len(request.prompt)
        self._engine = engine
        self._sink = _Sink(1)
        self._pending: collections.deque[StepToken] = collections.deque()
        self._ended = False

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (set at admission)."""
        seqs = self._sink.sequences
        return seqs[0].cached_tokens if seqs else 0

    @property
    def done(self) -> bool:
        """Finished, cancelled or failed: no more tokens will be produced."""
        return self._sink.live == 0

    def get(self, timeout: float | None = None) -> StepToken | None:
        """The next token; None on timeout, or once the request is over and drained."""
        while not self._pending:
            if self._ended:
                return None
            try:
                item = self._sink.queue.get(timeout=timeout)
            except queue.Empty:
                return None
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            if item is _END:
                self._ended = True
                continue
            for _, token in item:
                self._pending.append(token)
                self._ended |= token.finished
        return self._pending.popleft()

    def __iter__(self) -> Iterator[StepToken]:
        while (token := self.get()) is not None:
            yield token

    def cancel(self) -> None:
        """Stop the request; its pages are let go at the next step boundary."""
        self._engine._cancel(self._sink)


def _free_device_bytes(engine: Engine) -> int | None:
    """The smallest free memory over the params' devices, None where a backend reports none."""
    devices = {d for leaf in jax.tree.leaves(engine.params) for d in leaf.devices()}
    free = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # backends without the query raise rather than return None
            stats = None
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free) if free else None


def default_num_pages(engine: Engine, slots: int) -> int:
    """The pool size when ``num_pages`` is None: ``POOL_MEMORY_FRACTION`` of the device memory
    left after the weights where the backend reports it, else ``DEFAULT_POOL_TOKENS`` tokens'
    worth; never more than ``MAX_CONTEXTS_IN_POOL`` whole contexts per slot, never less than
    one whole context... of what is left (2 pages at least)."""
    ec, cfg = engine.engine_cfg, engine.cfg
    # With a split pool each device holds one shard: sized per shard, for its rows' pages.
    shards = engine.pool_shards
    context = pages_for(cfg.max_position_embeddings, ec.page_size)
    whole = engine.shard_pages_for([context] * slots, slots)
    free = _free_device_bytes(engine)
    if free is None:
        pages = min(whole, DEFAULT_POOL_TOKENS // ec.page_size // shards)
    else:
        pages = min(
            MAX_CONTEXTS_IN_POOL * whole, int(free * POOL_MEMORY_FRACTION) // engine.page_bytes()
        )
    return shards * max(2, 1 + pages)


# Compiled step programs, shared by engines of the same model shapes (an engine re-created for
# the same model and config compiles nothing).
_COMPILED: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
_COMPILED_MAX = 64
_COMPILED_LOCK = threading.Lock()


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))


_LIVE_ENGINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    for engine in list(_LIVE_ENGINES):
        engine.close()


class PersistentEngine:
    """One model's long-lived engine (contract: /work/helpers/ENGINE_API.md)."""

    def __init__(
        self,
        model: Model,
        config: EngineConfig | None = None,
        *,
        max_queue: int | None = 256,
        prefix_cache: bool | None = None,
        warmup: bool = True,
        lockstep: Channel | None = None,
    ):
        """``prefix_cache`` None follows ``config.prefix_cache`` (default on). ``max_queue``
        None leaves the queue unbounded. ``warmup=False`` compiles each bucket on its first use
        instead of at start-up (the set of programs is the same).

        ``lockstep`` (a multi-process job, ``k2jax.serving.lockstep``): every process builds
        its engine with the same arguments and a ``Channel``; process 0 is started and takes the
        requests, every other process calls ``follow()`` and replays process 0's steps."""
        self.model = model
        self._lockstep = lockstep
        self.config = config or EngineConfig()
        if prefix_cache is None:
            prefix_cache = self.config.prefix_cache
        self.max_queue = max_queue
        self._engine = Engine(
            model.config,
            model.params,
            model.dtype,
            self.config,
            mesh=getattr(model, "mesh", None),
            rules=getattr(model, "rules", ()),
        )
        self._target = target_override()
        ec = self.config
        slots = self._engine.slots_for(ec.max_batch)
        num_pages = ec.num_pages or default_num_pages(self._engine, slots)
        if lockstep is not None:  # each host sees its own free memory: process 0's size wins
            num_pages = lockstep.agree(num_pages)
        alloc = self._engine.new_allocator(num_pages, prefix_cache)
        self._scheduler = Scheduler(self._engine, slots, alloc, self._program)
        context_pages = pages_for(model.config.max_position_embeddings - 1, ec.page_size)
        self.widths = width_ladder(min(context_pages, alloc.pages_per_sequence), ec)
        self.chunks = sorted({1, ec.prefill_chunk})
        self.compile_count = 0
        self._programs: dict[tuple[int, int], Any] = {}
        self._base_key = (
            self._engine._step,
            _signature(self._engine.params),
            _signature((self._scheduler.pages, self._scheduler.seen)),
        )
        self._cv = threading.Condition()
        self._incoming: collections.deque[_Sequence] = collections.deque()
        self._cancels: list[_Sink] = []
        self._next_key = 0
        self._thread: threading.Thread | None = None
        self._started = self._closed = False
        self._error: BaseException | None = None
        _LIVE_ENGINES.add(self)
        if warmup:
            self.warm_up()

    # Programs.

    def _program(self, chunk: int, width: int):
        program = self._programs.get((chunk, width))
        if program is None:
            if chunk not in self.chunks or width not in self.widths:
                raise AssertionError(f"step shape ({chunk}, {width}) is outside the buckets")
            program = self._programs[chunk, width] = self._compile(chunk, width)
        return program

    def _compile(self, chunk: int, width: int):
        key = (*self._base_key, chunk, width)
        with _COMPILED_LOCK:
            if key in _COMPILED:
                _COMPILED.move_to_end(key)
                return _COMPILED[key]
        engine, sched = self._engine, self._scheduler
        slots = sched.slots
        inputs = (
            np.zeros((slots, chunk), np.int32),
            np.full((slots, chunk), -1, np.int32),
            np.zeros((slots, width), np.int32),
            np.zeros((slots,), np.int32),
            np.zeros((slots,), bool),
            np.zeros((slots,), np.int32),
            sampling.BatchSampling.from_params([SamplingParams()] * slots),
        )
        with contextlib.ExitStack() as stack:
            if self._target is not None:  # a lazily compiled bucket keeps the engine's target
                stack.enter_context(target(self._target))
            stack.enter_context(engine._context())
            placed = engine._put(inputs)
            if engine.mesh is None:
                compiled = engine._step.lower(engine.params, sched.pages, sched.seen, *placed)
                compiled = compiled.compile()
            else:
                # On a mesh an ahead-of-time program refuses the int4 expert arrays' layout
                # (sub-byte packing differs from what jit's own call path passes), so the jitted
                # step is compiled by running it once on an idle batch: every position is
                # padding (it writes only the scratch page) and nothing is emitted (the seen
                # table is rewritten unchanged). jit's cache then serves the bucket.
                sched.pages, sched.seen, _ = engine._step(
                    engine.params, sched.pages, sched.seen, *placed
                )
                compiled = engine._step
        self.compile_count += 1
        with _COMPILED_LOCK:
            _COMPILED[key] = compiled
            while len(_COMPILED) > _COMPILED_MAX:
                _COMPILED.popitem(last=False)
        return compiled

    def warm_up(self) -> None:
        """Compile every bucket's step program (and the small admission program) now."""
        for chunk in self.chunks:
            for width in self.widths:
                self._program(chunk, width)
        sched, engine = self._scheduler, self._engine
        with self._cv:
            if not sched.has_work():
                row = np.zeros((engine.cfg.vocab_size,), np.int8)
                sched.seen = _set_row(sched.seen, *engine._put((np.int32(0), row)))

    # Requests.

    def validate(self, request: EngineRequest, name: str = "request") -> None:
        """ValueError naming what is wrong with ``request`` for this engine (the prompt and
        ``max_new_tokens`` against the context and the pool, sampling, top_logprobs)."""
        if not isinstance(request, Request):
            raise ValueError(f"expected an EngineRequest, got {type(request).__name__}")
        if not isinstance(request.sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {request.sampling!r}")
        self._engine.validate(request)
        self._engine.check_fits(request, self._scheduler.alloc.pages_per_sequence, name)

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Validate and enqueue ``request``; ``QueueFull`` when the bounded queue is full."""
        self.validate(request)
        handle = RequestHandle(self, request)
        self._enqueue([request], handle._sink, bounded=True)
        return handle

    def _enqueue(self, requests: Sequence[EngineRequest], sink: _Sink, bounded: bool) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._error is not None:
                raise RuntimeError(f"the engine failed: {self._error!r}") from self._error
            if bounded and self.max_queue is not None:
                if self._queue_length() + len(requests) > self.max_queue:
                    raise QueueFull(
                        f"the request queue is full ({self.max_queue} waiting): retry later"
                    )
            for index, request in enumerate(requests):
                seq = self._engine.sequence(self._next_key, request, (sink, index))
                self._next_key += 1
                sink.sequences.append(seq)
                if request.max_new_tokens > 0:
                    self._incoming.append(seq)
                else:
                    sink.live -= 1
            if sink.live == 0:
                sink.put(_END)
            self._wake()

    def _cancel(self, sink: _Sink) -> None:
        with self._cv:
            if sink.live == 0 or sink in self._cancels:
                return
            self._cancels.append(sink)
            self._wake()

    def _queue_length(self) -> int:
        return len(self._incoming) + len(self._scheduler.waiting)

    def _wake(self) -> None:
        """Start the step thread if there is work and none runs (called holding ``_cv``)."""
        if self._lockstep is not None:
            self._cv.notify_all()  # the lockstep driver runs for the engine's whole life
            return
        if self._thread is not None or not self._started:
            return
        if not (self._incoming or self._cancels or self._scheduler.has_work()):
            return
        self._thread = threading.Thread(target=self._loop, name="k2jax-engine", daemon=True)
        self._thread.start()

    # The step thread.

    def _apply_pending(self, record: list | None = None) -> None:
        """Cancellations, then new requests, into the scheduler (holding ``_cv``); appends
        to ``record`` what followers must replay (``lockstep.Boundary.events``)."""
        for sink in self._cancels:
            for seq in sink.sequences:
                if seq in self._incoming:
                    self._incoming.remove(seq)
                else:
                    self._scheduler.drop(seq)
                    if record is not None:
                        record.append(("cancel", seq.key))
            if sink.live:
                sink.live = 0
                sink.put(_END)
        self._cancels.clear()
        while self._incoming:
            seq = self._incoming.popleft()
            self._scheduler.add(seq)
            if record is not None:
                record.append(("add", seq.key, seq.request))

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._apply_pending()
                if self._closed or not self._scheduler.has_work():
                    self._thread = None
                    self._cv.notify_all()
                    return
            self._step_and_deliver()

    def _step_and_deliver(self) -> None:
        try:
            produced = self._scheduler.step()
        except Exception as error:  # delivered to every consumer, never swallowed
            with self._cv:
                self._fail_all(error, broken=not isinstance(error, OutOfPages))
            return
        self._deliver(produced)

    # Lockstep (multi-process): process 0 drives, the others follow.

    def _drive(self) -> None:
        """Process 0's step thread in a lockstep job: publish each boundary, then step."""
        channel = self._lockstep
        while True:
            with self._cv:
                if not (
                    self._incoming or self._cancels or self._scheduler.has_work() or self._closed
                ):
                    self._cv.wait(timeout=channel.heartbeat_seconds)
                events: list = []
                self._apply_pending(events)
                closing = self._closed
                stepping = self._scheduler.has_work() and not closing
            try:
                channel.publish(Boundary(tuple(events), stepping, closing))
            except Exception as error:  # the followers are gone: nothing can run any more
                with self._cv:
                    self._fail_all(error, broken=True)
                    self._closed = True
                closing = True
            if closing:
                with self._cv:
                    self._thread = None
                    self._cv.notify_all()
                return
            if stepping:
                self._step_and_deliver()

    def follow(self) -> None:
        """Replay process 0's steps until it closes (every process but 0 of a lockstep job).

        Applies each published boundary's cancellations and admissions to this process's own
        scheduler, in process 0's order, and runs the same step; the tokens are process 0's
        to deliver, so nothing is kept here beyond the running sequences."""
        channel = self._lockstep
        if channel is None or channel.is_leader:
            raise RuntimeError("follow() is for processes other than 0 of a lockstep engine")
        sched = self._scheduler
        live: dict[Any, _Sequence] = {}
        while True:
            boundary = channel.receive()
            for event in boundary.events:
                if event[0] == "cancel":
                    seq = live.pop(event[1], None)
                    if seq is not None:
                        sched.drop(seq)
                else:
                    _, key, request = event
                    live[key] = seq = self._engine.sequence(key, request)
                    sched.add(seq)
            if boundary.closing:
                for seq in live.values():
                    sched.drop(seq)
                return
            if not boundary.stepping:
                continue
            try:
                produced = sched.step()
            except Exception:  # process 0 met the same error and ended every request
                for seq in live.values():
                    sched.drop(seq)
                live.clear()
                continue
            for seq, event in produced:
                if event.finished:
                    live.pop(seq.key, None)

    def _deliver(self, produced) -> None:
        by_sink: dict[int, tuple[_Sink, list]] = {}
        for seq, event in produced:
            sink, index = seq.sink
            token = StepToken(
                event.token, event.logprob, event.top_logprobs, event.finished, event.finish_reason
            )
            by_sink.setdefault(id(sink), (sink, []))[1].append((index, token))
        for sink, items in by_sink.values():
            with self._cv:
                sink.live -= sum(token.finished for _, token in items)
            sink.put(items)
            if sink.live == 0:
                sink.put(_END)

    def _fail_all(self, error: BaseException, broken: bool) -> None:
        """Every request ends with ``error``; a failure inside the step breaks the engine (its
        donated pool may be gone), running out of pages without preemption does not."""
        sched = self._scheduler
        seqs = [*self._incoming, *sched.waiting, *(s for s in sched.running if s is not None)]
        self._incoming.clear()
        sinks = {}
        for seq in seqs:
            sched.drop(seq)
            sinks[id(seq.sink[0])] = seq.sink[0]
        for sink in sinks.values():
            sink.live = 0
            sink.put(error)
        if broken:
            self._error = error

    # Life cycle and introspection.

    def start(self) -> None:
        """Run steps on a background thread whenever there is work."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._started = True
            if self._lockstep is not None:
                if not self._lockstep.is_leader:
                    raise RuntimeError(
                        "in a lockstep job only process 0 starts; the others follow()"
                    )
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._drive, name="k2jax-lockstep", daemon=True
                    )
                    self._thread.start()
                return
            self._wake()

    def close(self) -> None:
        """Stop the thread after its current step and end every request."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()  # a lockstep driver waiting for work publishes the close
            while self._thread is not None:
                self._cv.wait()
            self._apply_pending()
            sched = self._scheduler
            for seq in [*sched.waiting, *(s for s in sched.running if s is not None)]:
                sched.drop(seq)
                sink = seq.sink[0]
                if sink.live:
                    sink.live = 0
                    sink.put(_END)
        _LIVE_ENGINES.discard(self)

    def __enter__(self) -> PersistentEngine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_preemptions(self) -> int:
        return self._engine.num_preemptions

    def stats(self) -> EngineStats:
        with self._cv:
            sched, alloc = self._scheduler, self._scheduler.alloc
            return EngineStats(
                queue_length=self._queue_length(),
                running=sched.num_running,
                num_pages=alloc.num_usable,
                pages_used=alloc.num_used,
                pages_cached=alloc.num_cached,
                prefix_hit_tokens=sched.prefix_hit_tokens,
                prefix_lookup_tokens=sched.prefix_lookup_tokens,
                prefill_tokens_computed=sched.prefill_tokens_computed,
                num_preemptions=self._engine.num_preemptions,
                compile_count=self.compile_count,
            )

    def all_pages_free_or_cached(self) -> bool:
        """Nothing leaks: no request holds a page (true whenever the engine is idle)."""
        with self._cv:
            return self._scheduler.alloc.all_free_or_cached()

    def pool(self) -> np.ndarray:
        """The page pool on the host (tests: checksums of cached pages), once the engine is
        idle; RuntimeError when it has work."""
        with self._cv:
            while self._thread is not None and not self._scheduler.has_work():
                self._cv.wait()  # the step thread is about to exit
            if self._thread is not None or self._incoming:
                raise RuntimeError("the pool can only be read while the engine is idle")
            return np.asarray(jax.device_get(self._scheduler.pages))


# Model.generate / generate_stream on the model's persistent engine.


def _requests(prompts, max_new_tokens, options: GenerateOptions) -> list[Request]:
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


def generate_stream(model: Model, prompts, max_new_tokens, options: GenerateOptions):
    """``Model.generate_stream``: per-step lists of (prompt_index, token[, logprob]).

    Runs on ``model.persistent_engine`` with ``max_batch`` slots lowered to the next power of two
    of the prompt count (one prompt decodes in a one-row program, as the batch engine did).
    Prompts and options are checked here, at call time, not at the first iteration; closing the
    stream early cancels its requests."""
    requests = _requests(prompts, max_new_tokens, options)
    slots = min(options.engine.max_batch, _next_pow2(len(requests)))
    engine = model.persistent_engine(dataclasses.replace(options.engine, max_batch=slots))
    for i, r in enumerate(requests):
        engine.validate(r, f"request {i}")
    with_logprobs = options.sampling.logprobs

    def stream():
        sink = _Sink(len(requests))
        engine._enqueue(requests, sink, bounded=False)
        try:
            while True:
                item = sink.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if with_logprobs:
                    yield [(i, t.token, t.logprob) for i, t in item]
                else:
                    yield [(i, t.token) for i, t in item]
        finally:
            engine._cancel(sink)

    return stream()


def generate(model: Model, prompts, max_new_tokens, options: GenerateOptions):
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
