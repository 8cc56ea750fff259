"""The persistent engine: no compilation after warm-up, online batching from many threads,
cancellation, a bounded queue, top logprobs against transformers, and Model.generate on it.

One tiny random K2 model (INT4 experts, YaRN, float32), the one tests/test_engine.py uses. The
engines here use a small pool (page size 4, 32 usable pages) so the width ladder has two rungs
and warm-up compiles four programs.
"""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
import reference

import k2jax
from k2jax.serving.options import EngineConfig
from k2jax.serving.persistent_engine import EngineRequest, PersistentEngine, QueueFull
from k2jax.serving.sampling import SamplingParams

CONFIG = EngineConfig(max_batch=4, page_size=4, num_pages=33, prefill_chunk=8)
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def ref():
    return reference.build(seed=3)


@pytest.fixture(scope="module")
def model(ref, tmp_path_factory):
    path = reference.write_checkpoint(ref, tmp_path_factory.mktemp("ckpt"))
    return k2jax.load(path, dtype="float32")


@pytest.fixture(scope="module")
def engine(model):
    with PersistentEngine(model, CONFIG) as engine:
        yield engine


def _tokens(handle):
    return [t.token for t in handle]


def _prompt(rng, n):
    return tuple(int(t) for t in rng.integers(0, 250, n))


def test_no_compilation_after_warm_up_whatever_the_prompt_lengths(ref, engine):
    # Warm-up compiled (or found compiled) every bucket: 2 token axes x 2 widths.
    assert engine.chunks == [1, 8] and engine.widths == [16, 32]
    assert len(engine._programs) == 4
    compiled_before = engine.compile_count
    backend_compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            backend_compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        rng = np.random.default_rng(0)
        lengths = [1, 2, 3, 5, 8, 9, 16, 17, 31, 40, 63, 64, 65, 90]
        handles = [
            engine.submit(
                EngineRequest(
                    _prompt(rng, n),
                    int(rng.integers(1, 12)),
                    SamplingParams(seed=n, top_p=0.9, logprobs=True),
                    stop_token_ids=(),
                    top_logprobs=n % 4,
                )
            )
            for n in lengths
        ]
        outputs = [list(h) for h in handles]
        greedy_prompt = _prompt(rng, 37)
        greedy = _tokens(engine.submit(EngineRequest(greedy_prompt, 10, GREEDY, ())))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert backend_compiles == []
    assert engine.compile_count == compiled_before
    assert [len(o[-1].top_logprobs) for o in outputs] == [n % 4 for n in lengths]
    assert all(o[-1].finished and o[-1].finish_reason == "length" for o in outputs)
    assert greedy == reference.greedy_batch(ref, [list(greedy_prompt)], 10)[0][0]
    assert engine.all_pages_free_or_cached()


def test_concurrent_clients_get_the_tokens_they_get_alone(engine):
    """16 threads submit at once (more than the 4 slots: online batching from the queue); each
    request's tokens equal what it produces alone (seeded sampling and greedy)."""
    rng = np.random.default_rng(1)
    requests = [
        EngineRequest(
            _prompt(rng, int(rng.integers(3, 50))),
            int(rng.integers(2, 10)),
            GREEDY if i % 3 == 0 else SamplingParams(seed=i, temperature=0.8, top_k=40),
            stop_token_ids=(),
        )
        for i in range(16)
    ]
    alone = [_tokens(engine.submit(r)) for r in requests]
    together: list = [None] * len(requests)

    def client(i):
        together[i] = _tokens(engine.submit(requests[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert together == alone
    assert [len(t) for t in alone] == [r.max_new_tokens for r in requests]
    assert engine.all_pages_free_or_cached()


def test_cancellation_frees_pages_and_ends_the_stream(engine):
    rng = np.random.default_rng(2)
    running = engine.submit(EngineRequest(_prompt(rng, 30), 90, GREEDY, ()))
    first = running.get(timeout=300)
    assert first is not None and not first.finished
    running.cancel()
    rest = list(running)  # ends (tokens already produced may still arrive)
    assert len(rest) < 89 and running.done
    # A request still queued is cancelled before it ever runs.
    queued = PersistentEngine(engine.model, CONFIG, warmup=False)
    handle = queued.submit(EngineRequest(_prompt(rng, 5), 5, GREEDY, ()))
    handle.cancel()
    queued.start()
    assert list(handle) == [] and handle.done
    assert queued.stats().queue_length == 0 and queued.all_pages_free_or_cached()
    queued.close()
    stats = engine.stats()
    assert stats.running == 0 and stats.pages_used == 0 and engine.all_pages_free_or_cached()


def test_bounded_queue_refuses_when_full(model):
    engine = PersistentEngine(model, CONFIG, max_queue=2, warmup=False)
    try:
        handles = [engine.submit(EngineRequest((1, 2, 3), 2, GREEDY, ())) for _ in range(2)]
        with pytest.raises(QueueFull, match="queue is full"):
            engine.submit(EngineRequest((1, 2, 3), 2, GREEDY, ()))
        assert engine.stats().queue_length == 2
        engine.start()
        assert [len(_tokens(h)) for h in handles] == [2, 2]
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(EngineRequest((1, 2, 3), 2, GREEDY, ()))


def test_bad_requests_are_refused_by_name(engine):
    context = engine.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"prompt \(10 tokens\) \+ max_new_tokens \({context}\)"):
        engine.validate(EngineRequest(tuple(range(10)), context))
    with pytest.raises(ValueError, match="top_logprobs must be an integer in \\[0, 20\\]"):
        engine.submit(EngineRequest((1, 2), 2, top_logprobs=21))
    with pytest.raises(ValueError, match="request needs 33 pages of 4 tokens"):
        engine.submit(EngineRequest(tuple(range(100)), 33))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        engine.submit(EngineRequest((1, 256), 2))


def test_logprobs_and_top_logprobs_equal_transformers(ref, engine):
    prompt = [3, 90, 45, 45, 120, 8, 77, 1, 64]
    new = 6
    want, want_logprobs = reference.greedy_batch(ref, [prompt], new)
    got = list(
        engine.submit(
            EngineRequest(tuple(prompt), new, SamplingParams(temperature=0.0, logprobs=True), (), 5)
        )
    )
    assert [t.token for t in got] == want[0]
    for i, t in enumerate(got):
        ref_lp = want_logprobs[0, i]
        ids = [tid for tid, _ in t.top_logprobs]
        assert ids[0] == t.token
        np.testing.assert_allclose(t.logprob, ref_lp[t.token], atol=2e-4)
        np.testing.assert_allclose([v for _, v in t.top_logprobs], ref_lp[ids], atol=2e-4)
        assert list(np.sort(ref_lp)[::-1][:5]) == pytest.approx(
            [v for _, v in t.top_logprobs], abs=2e-4
        )


def test_model_generate_keeps_one_engine_and_its_cache(model):
    prompt = [list(range(5, 45))]
    options = dict(temperature=0.0, stop_token_ids=[], page_size=4, num_pages=33)
    first = model.generate(prompt, 4, **options)
    engine = model.persistent_engine(EngineConfig(max_batch=1, page_size=4, num_pages=33))
    hits = engine.stats().prefix_hit_tokens
    assert model.generate(prompt, 4, **options) == first
    # The same engine served the second call and found the prompt's 9 full pages cached.
    assert engine.stats().prefix_hit_tokens == hits + 36
    assert engine.all_pages_free_or_cached()
