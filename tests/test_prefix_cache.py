"""Prefix caching: the allocator's sharing and eviction rules, and the engine's results with the
cache equal to its results without it (greedy and seeded sampling), under eviction pressure,
with cached pages checksummed to prove a shared page is never written."""

from __future__ import annotations

import numpy as np
import pytest
import reference

import k2jax
from k2jax.serving.options import EngineConfig
from k2jax.serving.page_allocator import OutOfPages, PageAllocator
from k2jax.serving.persistent_engine import EngineRequest, PersistentEngine
from k2jax.serving.sampling import SamplingParams

CONFIG = EngineConfig(max_batch=4, page_size=4, num_pages=33, prefill_chunk=8)


def test_allocator_shares_full_pages_by_prefix_and_evicts_least_recent_first():
    alloc = PageAllocator(num_pages=7, page_size=2, prefix_cache=True)
    a = [1, 2, 3, 4, 5]
    hits, digests = alloc.cached_prefix(a)
    assert hits == [] and len(digests) == 2  # (5 - 1) // 2 full pages may ever be shared
    alloc.start("a", hits, digests)
    alloc.ensure("a", 5)
    alloc.name_full_pages("a", a, 5)
    # b shares a's two full pages (a is still running); its third page is its own.
    b = [1, 2, 3, 4, 9, 9]
    hits, digests = alloc.cached_prefix(b)
    assert hits == alloc.pages("a")[:2]
    alloc.start("b", hits, digests)
    assert alloc.ensure("b", 6)[2] not in alloc.pages("a")
    # A different first page shares nothing, even with equal later tokens (chain hash).
    assert alloc.cached_prefix([7, 7, 3, 4, 5])[0] == []
    alloc.free("a")
    assert alloc.num_used == 3 and alloc.num_cached == 0  # shared pages still held by b
    alloc.free("b")
    # Named pages stay cached (idle), the rest are free: nothing leaked.
    assert alloc.num_cached == 2 and alloc.all_free_or_cached()
    assert alloc.cached_prefix(b)[0] == hits
    # Filling the pool evicts idle pages, later page of a prefix first.
    first, second = hits
    alloc.ensure("c", 2 * alloc.num_free + 2)
    assert alloc.num_cached == 1 and alloc.cached_prefix(b)[0] == [first]
    alloc.ensure("c", 2 * 6)
    assert alloc.num_cached == 0 and alloc.cached_prefix(b)[0] == []
    with pytest.raises(OutOfPages):
        alloc.ensure("d", 1)
    alloc.free("c")
    assert alloc.all_free_or_cached()


def test_allocator_never_hands_out_a_held_page_with_sharing():
    alloc = PageAllocator(num_pages=12, page_size=2, prefix_cache=True)
    rng = np.random.default_rng(0)
    live: dict[int, list[int]] = {}
    for _ in range(400):
        seq = int(rng.integers(6))
        if seq in live and rng.random() < 0.3:
            alloc.free(seq)
            del live[seq]
            continue
        if seq not in live:
            tokens = [int(t) for t in rng.integers(0, 3, int(rng.integers(1, 12)))]
            hits, digests = alloc.cached_prefix(tokens)
            if not alloc.fits(hits, len(tokens)):
                continue
            alloc.start(seq, hits, digests)
            live[seq] = tokens
        tokens = live[seq]
        try:
            alloc.ensure(seq, len(tokens))
        except OutOfPages:
            continue
        alloc.name_full_pages(seq, tokens, len(tokens))
        held = [p for s in live for p in alloc.pages(s)]
        assert 0 not in held
        # A page held twice is a full named page every holder starts with the same prefix.
        for page in {p for p in held if held.count(p) > 1}:
            owners = [s for s in live if page in alloc.pages(s)]
            k = alloc.pages(owners[0]).index(page)
            prefixes = {tuple(live[s][: 2 * (k + 1)]) for s in owners}
            assert len(prefixes) == 1 and all(alloc.pages(s).index(page) == k for s in owners)
        assert len(set(held)) + alloc.num_available == 11
    for seq in list(live):
        alloc.free(seq)
    assert alloc.all_free_or_cached()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return reference.write_checkpoint(reference.build(seed=3), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return k2jax.load(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def engines(model):
    cached = PersistentEngine(model, CONFIG)
    plain = PersistentEngine(model, CONFIG, prefix_cache=False)
    cached.start()
    plain.start()
    yield cached, plain
    cached.close()
    plain.close()


SYSTEM = tuple(range(100, 137))  # 37 tokens: 9 full pages of 4, shared by every conversation


def _conversation_requests(rng, turns=3):
    """Requests that grow like a chat: each prompt extends the previous one."""
    prompt = SYSTEM
    requests = []
    for turn in range(turns):
        prompt = prompt + tuple(int(t) for t in rng.integers(0, 250, int(rng.integers(3, 14))))
        sampling = (
            SamplingParams(temperature=0.0, logprobs=True)
            if turn % 2
            else SamplingParams(seed=int(rng.integers(1000)), top_p=0.9, logprobs=True)
        )
        requests.append(EngineRequest(prompt, 6, sampling, stop_token_ids=()))
    return requests


def _run(engine, requests):
    handles = [engine.submit(r) for r in requests]
    out = [list(h) for h in handles]
    return (
        [[t.token for t in o] for o in out],
        [[t.logprob for t in o] for o in out],
        [h.cached_tokens for h in handles],
    )


def test_results_with_the_cache_equal_results_without(engines):
    cached, plain = engines
    _run(cached, [EngineRequest(SYSTEM + (0,), 1, stop_token_ids=())])  # caches the system
    rng = np.random.default_rng(0)
    conversations = [_conversation_requests(rng) for _ in range(3)]
    before = cached.stats()
    for requests in conversations:
        for r in requests:  # one turn at a time, as a client would
            want, want_lp, plain_hits = _run(plain, [r])
            got, got_lp, hits = _run(cached, [r])
            assert got == want
            np.testing.assert_allclose(got_lp, want_lp, atol=1e-4)
            assert plain_hits == [0]
            # Every full page of the prompt before its last token was cached by the previous
            # turn or conversation (the system prompt is shared by all).
            assert hits[0] >= 36
    after = cached.stats()
    assert after.prefix_hit_tokens - before.prefix_hit_tokens >= 9 * 36
    # Every conversation at once (4 slots): still identical.
    flat = [r for requests in conversations for r in requests]
    assert _run(cached, flat)[0] == _run(plain, flat)[0]
    assert cached.all_pages_free_or_cached() and plain.all_pages_free_or_cached()


def test_eviction_under_pressure_keeps_results_and_forgets_old_prefixes(model, engines):
    _, plain = engines
    engine = PersistentEngine(model, CONFIG)  # 32 usable pages of 4 tokens
    engine.start()
    try:
        rng = np.random.default_rng(1)
        first = EngineRequest(tuple(int(t) for t in rng.integers(0, 250, 41)), 3, stop_token_ids=())
        _, _, hits = _run(engine, [first])
        assert engine.stats().pages_cached == 10
        # Many distinct prompts, four at a time, need more pages than the pool has free.
        others = [
            EngineRequest(tuple(int(t) for t in rng.integers(0, 250, 30)), 4, stop_token_ids=())
            for _ in range(12)
        ]
        assert _run(engine, others)[0] == _run(plain, others)[0]
        stats = engine.stats()
        assert stats.pages_cached <= 32 and stats.pages_used == 0
        # The first prompt's pages were evicted (least recently used): nothing is hit.
        tokens, _, hits = _run(engine, [first])
        assert hits == [0] and tokens == _run(plain, [first])[0]
        assert engine.all_pages_free_or_cached()
    finally:
        engine.close()


def test_a_shared_page_is_never_overwritten(engines):
    cached, _ = engines
    rng = np.random.default_rng(2)
    prefix = SYSTEM + tuple(int(t) for t in rng.integers(0, 250, 11))  # 48 tokens: 12 pages
    _run(cached, [EngineRequest(prefix + (5,), 2, stop_token_ids=())])
    pages, _ = cached._scheduler.alloc.cached_prefix(list(prefix) + [5])
    assert len(pages) == 12
    before = cached.pool()[:, pages].copy()
    # Requests that share the prefix and continue it differently, running together with
    # others, prefilling and decoding past it.
    requests = [
        EngineRequest(prefix + tuple(int(t) for t in rng.integers(0, 250, n)), 8, stop_token_ids=())
        for n in (1, 3, 4, 9, 14)
    ]
    _, _, hits = _run(cached, requests)
    assert all(h == 48 for h in hits)
    after = cached.pool()[:, pages]
    np.testing.assert_array_equal(after, before)
    assert cached.all_pages_free_or_cached()


def test_cancelling_a_request_that_shares_pages_frees_only_its_own(engines):
    cached, _ = engines
    prompt = SYSTEM + (1, 2, 3)
    runner = cached.submit(EngineRequest(prompt, 60, SamplingParams(temperature=0.0), ()))
    assert runner.get(timeout=300) is not None
    assert runner.cached_tokens == 36
    runner.cancel()
    list(runner)
    assert runner.done
    # The shared prefix is still cached for the next request.
    follow = cached.submit(EngineRequest(prompt + (4,), 2, SamplingParams(temperature=0.0), ()))
    list(follow)
    assert follow.cached_tokens >= 36
    assert cached.stats().pages_used == 0 and cached.all_pages_free_or_cached()


def test_a_striped_pool_reuses_a_prefix_across_all_8_devices(checkpoint, engines):
    """``context_parallel`` on 8 fake devices (data=2, expert=2, tensor=2): the pool striped
    (the engine's ``StripedAllocator``, pages of 4, so the shared prefix spans every device),
    the prefix cache on. A follow-up turn reuses the first turn's full pages from every
    shard and gives the one-device engine's tokens, greedy and seeded."""
    import dataclasses

    from sharding.mesh import make_mesh

    _, plain = engines
    mesh = make_mesh(data=2, expert=2, tensor=2)
    striped_model = k2jax.load(checkpoint, dtype="float32", mesh=mesh, strategy="context_parallel")
    requests = _conversation_requests(np.random.default_rng(5), turns=2)
    config = dataclasses.replace(CONFIG, num_pages=64)  # 8 shards of 8 pages
    with PersistentEngine(striped_model, config, prefix_cache=True) as striped:
        assert striped._engine.striped and striped._engine.pool_shards == 8
        first, first_lp, first_hits = _run(striped, requests[:1])
        follow, follow_lp, follow_hits = _run(striped, requests[1:])
    want, want_lp, _ = _run(plain, requests)
    assert first + follow == want
    np.testing.assert_allclose(first_lp + follow_lp, want_lp, atol=1e-4)
    assert first_hits == [0] and follow_hits[0] >= 36
