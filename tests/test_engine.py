"""The engine against the reference: greedy tokens equal transformers' greedy ``generate()``.

One tiny random K2 model (INT4 experts, YaRN, float32) serves every test. Most runs share one
engine shape (4 batch slots, page size 16, an 8-page pool, prefill chunks of 8 tokens), so the
step programs compile once for the module.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import k2jax
from k2jax import model as k2model
from k2jax.model import kv_cache
from k2jax.serving import engine as k2engine
from k2jax.serving.page_allocator import OutOfPages, pages_for
from k2jax.serving.sampling import SamplingParams

NEW = 20
CHUNK = 8
PAGES = 8
# Different lengths, one longer than two prefill chunks.
RAGGED = [
    [11, 200, 7],
    [3, 90, 45, 45, 120, 8, 77, 1, 64],
    [5, 17, 33, 2, 99, 100, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
]


@pytest.fixture(scope="module")
def ref():
    return reference.build(seed=3)


@pytest.fixture(scope="module")
def model(ref, tmp_path_factory):
    path = reference.write_checkpoint(ref, tmp_path_factory.mktemp("ckpt"))
    return k2jax.load(path, dtype="float32")


def hf_greedy(ref, prompts, new=NEW):
    """transformers' greedy generate over a left-padded batch (no early stop)."""
    return reference.greedy_batch(ref, prompts, new)


@pytest.fixture(scope="module")
def hf_ragged(ref):
    return hf_greedy(ref, RAGGED)


def greedy(model, prompts, **kw):
    kw = {"prefill_chunk": CHUNK, "num_pages": PAGES, "max_batch": 4, **kw}
    return model.generate(prompts, NEW, temperature=0.0, stop_token_ids=[], **kw)


def test_greedy_single_prompt_matches_reference(ref, model):
    prompt = [RAGGED[2]]
    want, _ = hf_greedy(ref, prompt)
    assert greedy(model, prompt) == want


def test_greedy_equal_length_batch_matches_reference(ref, model):
    prompts = [[9, 8, 7, 6, 5, 4], [100, 3, 250, 17, 17, 2], [1, 2, 3, 4, 5, 6]]
    want, _ = hf_greedy(ref, prompts)
    assert greedy(model, prompts) == want


def test_greedy_ragged_batch_matches_reference_with_logprobs(model, hf_ragged):
    want, want_logprobs = hf_ragged
    tokens, logprobs = greedy(model, RAGGED, logprobs=True)
    assert tokens == want
    for row, lp in enumerate(logprobs):
        expected = want_logprobs[row, np.arange(NEW), want[row]]
        np.testing.assert_allclose(lp, expected, atol=2e-4)


def test_stream_yields_each_step_tokens(model, hf_ragged):
    # Without the prefix cache: earlier tests cached these prompts' first pages, which would
    # let the longest prompt skip its first chunk.
    steps = list(
        model.generate_stream(
            RAGGED,
            NEW,
            temperature=0.0,
            stop_token_ids=[],
            prefill_chunk=CHUNK,
            num_pages=PAGES,
            max_batch=4,
            prefix_cache=False,
        )
    )
    got = [[] for _ in RAGGED]
    for step in steps:
        assert len({i for i, _ in step}) == len(step), "one token per prompt per step"
        for i, token in step:
            got[i].append(token)
    assert got == hf_ragged[0]
    # Prefill is chunked, so the longest prompt's first token comes in a later step.
    assert [i for i, _ in steps[0]] == [0]


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_page_size_is_invisible(model, hf_ragged, page_size):
    assert greedy(model, RAGGED, page_size=page_size, num_pages=None) == hf_ragged[0]


def test_pool_just_large_enough(model, hf_ragged):
    # The last new token is never fed back, so a sequence caches prompt + NEW - 1 positions.
    need = 1 + sum(pages_for(len(p) + NEW - 1, 16) for p in RAGGED)
    engine = k2engine.Engine(
        model.config,
        model.params,
        model.dtype,
        k2engine.EngineConfig(max_batch=4, prefill_chunk=CHUNK, num_pages=need),
    )
    assert _run(engine, RAGGED) == hf_ragged[0]
    assert engine.num_preemptions == 0


def _run(engine, prompts, new=NEW):
    requests = [
        k2engine.Request(tuple(p), new, SamplingParams(temperature=0.0), stop_token_ids=())
        for p in prompts
    ]
    got = [[] for _ in prompts]
    for events in engine.run(requests):
        for e in events:
            got[e.index].append(e.token)
    return got


def test_small_pool_preempts_and_still_matches(model, hf_ragged):
    # 4 usable pages of 16: the longest sequence alone needs 3, so the others must wait or be
    # preempted and recomputed.
    engine = k2engine.Engine(
        model.config,
        model.params,
        model.dtype,
        k2engine.EngineConfig(max_batch=4, prefill_chunk=CHUNK, num_pages=5),
    )
    assert _run(engine, RAGGED) == hf_ragged[0]
    assert engine.num_preemptions > 0


def test_small_pool_without_preemption_raises(model):
    engine = k2engine.Engine(
        model.config,
        model.params,
        model.dtype,
        k2engine.EngineConfig(max_batch=4, prefill_chunk=CHUNK, num_pages=5, preempt=False),
    )
    with pytest.raises(OutOfPages, match="preemption is disabled"):
        _run(engine, RAGGED)


def test_request_larger_than_pool_is_refused(model):
    with pytest.raises(OutOfPages, match="request 2 needs 3 pages"):
        greedy(model, RAGGED, num_pages=3)


def test_more_prompts_than_slots_join_as_others_finish(ref, model):
    prompts = [[7, 7, 1], [200, 3], [45, 46, 47, 48], [9], [30, 31, 32, 33, 34]]
    want, _ = hf_greedy(ref, prompts)
    assert greedy(model, prompts) == want


def test_stop_token_ends_a_request_and_is_included(model, hf_ragged):
    want = hf_ragged[0]
    stop = want[1][4]
    got = model.generate(
        RAGGED,
        NEW,
        temperature=0.0,
        stop_token_ids=[stop],
        prefill_chunk=CHUNK,
        num_pages=PAGES,
        max_batch=4,
    )
    for row, tokens in zip(want, got, strict=True):
        cut = row.index(stop) + 1 if stop in row else NEW
        assert tokens == row[:cut]
    assert len(got[1]) == 5


def test_default_stop_is_config_eos(model, hf_ragged):
    eos = model.config.eos_token_id
    row = hf_ragged[0][0]
    got = model.generate(
        [RAGGED[0]], NEW, temperature=0.0, prefill_chunk=CHUNK, num_pages=PAGES, max_batch=4
    )[0]
    assert got == (row[: row.index(eos) + 1] if eos in row else row)


def test_decode_after_chunked_prefill_equals_full_forward(model):
    """Prefill in chunks through the paged cache, decode the rest one token at a time; the
    logits at every position equal one naive (uncached) forward pass over the whole sequence."""
    cfg, params = model.config, model.params
    tokens = np.array(RAGGED[2] + [4, 40, 140, 240])
    n, chunk, page = len(tokens), 5, 4
    full = model.logits([tokens.tolist()])[0]
    # Non-contiguous pages, so the block table really is a table.
    table = np.array([[7, 2, 9, 4, 11, 6]], np.int32)
    pages = kv_cache.empty_pages(cfg.num_layers, 12, page, cfg.cache_width, jnp.float32)

    @jax.jit
    def run(pages, toks, pos):
        cache = kv_cache.PagedCache(pages, jnp.asarray(table))
        x, pages = k2model.forward(params, toks, pos, cache, cfg=cfg, dtype=jnp.float32)
        return k2model.lm_logits(params, x, cfg=cfg, dtype=jnp.float32), pages

    prompt_len = n - 4
    got = []
    start = 0
    while start < n:
        # Chunks (the last one padded) for the prompt, then one token at a time.
        t = chunk if start < prompt_len else 1
        k = min(chunk, prompt_len - start) if start < prompt_len else 1
        toks = np.zeros((1, t), np.int32)
        pos = np.full((1, t), -1, np.int32)
        toks[0, :k], pos[0, :k] = tokens[start : start + k], np.arange(start, start + k)
        logits, pages = run(pages, toks, pos)
        got.append(np.asarray(logits)[0, :k])
        start += k
    np.testing.assert_allclose(np.concatenate(got), full, atol=5e-5, rtol=1e-5)
    # Padding wrote only to the scratch page: unused pages stay zero.
    used = set(table[0, : pages_for(n, page)]) | {0}
    unused = [p for p in range(12) if p not in used]
    assert not np.asarray(pages)[:, unused].any()


def test_cpu_engine_runs_on_per_layer_views_of_the_stacks(model):
    """On one CPU device the engine runs unrolled over per-layer views of the layer stacks (so
    XLA:CPU never copies a layer's weights out of a stack): each view aliases its slice of the
    stacked buffer, costing no memory, and forward over the views equals forward over the
    stacks."""
    engine = k2engine.Engine(model.config, model.params, model.dtype)
    stacks = [s for s in k2model.STACKS if s in model.params]
    assert stacks
    for stack in stacks:
        layers = engine.params[stack]
        assert isinstance(layers, tuple)
        assert len(layers) == jax.tree.leaves(model.params[stack])[0].shape[0]
        for i, layer in enumerate(layers):
            for whole, view in zip(
                jax.tree.leaves(model.params[stack]), jax.tree.leaves(layer), strict=True
            ):
                step = whole.nbytes // whole.shape[0]
                assert view.shape == whole.shape[1:] and view.dtype == whole.dtype
                assert view.unsafe_buffer_pointer() == whole.unsafe_buffer_pointer() + i * step
    tokens = jnp.asarray([RAGGED[2]])
    positions = jnp.arange(tokens.shape[1])[None]

    def hidden(params):
        return k2model.forward(params, tokens, positions, cfg=model.config, dtype=jnp.float32)[0]

    np.testing.assert_allclose(
        np.asarray(hidden(engine.params)), np.asarray(hidden(model.params)), atol=1e-5, rtol=1e-5
    )


def test_sampled_tokens_depend_only_on_the_request_seed(model):
    """A sampled request draws the same tokens alone and in a batch with other requests."""

    def run(requests, max_batch):
        engine = k2engine.Engine(
            model.config,
            model.params,
            model.dtype,
            k2engine.EngineConfig(max_batch=max_batch, prefill_chunk=CHUNK, num_pages=PAGES),
        )
        got = [[] for _ in requests]
        for events in engine.run(requests):
            for e in events:
                got[e.index].append(e.token)
        return got

    a = k2engine.Request((5, 6, 7, 8, 9), 12, SamplingParams(seed=5, top_p=0.9), ())
    b = k2engine.Request((1, 2), 7, SamplingParams(seed=9, temperature=0.7, top_k=20), ())
    c = k2engine.Request(tuple(range(20, 50)), 12, SamplingParams(seed=1, min_p=0.05), ())
    alone = run([a], 1)[0]
    mixed = run([c, b, a, b], 4)
    assert mixed[2] == alone
    assert mixed[1] == mixed[3]  # same request, same seed, different slots
    other_seed = dataclasses.replace(a, sampling=dataclasses.replace(a.sampling, seed=6))
    assert run([other_seed], 1)[0] != alone


@pytest.mark.parametrize(
    "prompts, culprit",
    [([[1.5, 2.9]], "1.5"), ([[True, False]], "True"), ([["1", "2"]], "'1'"), ("12", "list")],
)
def test_non_integer_token_ids_are_refused_at_call_time(model, prompts, culprit):
    """Floats, bools and strings are not token ids: refused when generate / generate_stream /
    logits is called (not silently truncated, not at the first iteration)."""
    with pytest.raises(ValueError, match="token ids must be integers|token-id lists") as err:
        model.generate(prompts, 2)
    assert culprit in str(err.value)
    with pytest.raises(ValueError):
        model.generate_stream(prompts, 2)  # no iteration needed
    if not isinstance(prompts, str):
        with pytest.raises(ValueError):
            model.logits(prompts)


def test_options_are_checked_at_call_time_and_name_what_is_wrong(model):
    with pytest.raises(ValueError, match=r"seed = 4294967296.*\[0, 2\*\*32\)"):
        model.generate_stream([[1, 2]], 2, seed=2**32)
    with pytest.raises(TypeError, match="unknown generation option.*temprature"):
        model.generate([[1, 2]], 2, temprature=0.5)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        model.generate_stream([[1, 2]], model.config.max_position_embeddings)


def test_the_largest_seed_with_several_prompts_wraps_per_prompt(model):
    """Prompt i draws with (seed + i) mod 2**32: the last valid seed works for a batch, and
    its second prompt draws as seed 0 does for a first prompt."""
    opts = dict(temperature=1.0, stop_token_ids=[])
    a = model.generate([[1, 2, 3], [4, 5, 6]], 4, seed=2**32 - 1, **opts)
    b = model.generate([[4, 5, 6]], 4, seed=0, **opts)
    assert a[1] == b[0]
