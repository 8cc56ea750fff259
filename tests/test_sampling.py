"""The sampler: validation, seeded determinism, truncation that never leaks, the right law."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from k2jax.serving import sampling
from k2jax.serving.sampling import BatchSampling, SamplingParams

V = 12
LOGITS_V = np.array([2.0, 1.5, 1.2, 0.9, 0.5, 0.3, 0.0, -0.4, -1.0, -1.5, -2.5, -4.0], np.float32)

_sample = jax.jit(sampling.sample)


def draw(rows: list[SamplingParams], logits_BV=None, seen_BV=None, step_B=None):
    b = len(rows)
    logits_BV = np.tile(LOGITS_V, (b, 1)) if logits_BV is None else logits_BV
    seen_BV = np.zeros(logits_BV.shape, np.int8) if seen_BV is None else seen_BV
    step_B = np.zeros(b, np.int32) if step_B is None else step_B
    tokens, logprobs = _sample(logits_BV, seen_BV, step_B, BatchSampling.from_params(rows))
    return np.asarray(tokens), np.asarray(logprobs)


@functools.lru_cache
def many(params: SamplingParams, n: int = 4096) -> np.ndarray:
    """n draws of one request: the same logits at steps 0..n-1 (each step its own key)."""
    tokens, _ = draw([params] * n, step_B=np.arange(n, dtype=np.int32))
    return tokens


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, r"top_p.*\(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.0}, r"min_p.*\[0, 1\)"),
        ({"min_p": -0.1}, "min_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": float("inf")}, "presence_penalty"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_defaults_follow_k2_thinking():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, None, 0.0)


def test_temperature_zero_is_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, V)).astype(np.float32)
    tokens, _ = draw([SamplingParams(temperature=0.0, seed=i) for i in range(6)], logits)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_same_seed_same_tokens_whatever_the_batch():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, V)).astype(np.float32)
    rows = [SamplingParams(seed=s, top_p=0.9) for s in (5, 6, 7, 8)]
    steps = np.array([3, 0, 9, 2], np.int32)
    batched, _ = draw(rows, logits, step_B=steps)
    alone = [draw([rows[i]], logits[i : i + 1], step_B=steps[i : i + 1])[0][0] for i in range(4)]
    np.testing.assert_array_equal(batched, alone)
    # The same row placed elsewhere in a different batch draws the same token.
    moved, _ = draw([rows[3], rows[0]], logits[[3, 0]], step_B=steps[[3, 0]])
    np.testing.assert_array_equal(moved, batched[[3, 0]])
    # And different seeds do differ somewhere over many draws.
    assert not np.array_equal(many(SamplingParams(seed=1)), many(SamplingParams(seed=2)))


def test_top_k_never_emits_excluded_tokens():
    got = many(SamplingParams(top_k=3, seed=11))
    assert set(got) == {0, 1, 2}


def test_top_p_never_emits_excluded_tokens():
    probs = softmax(LOGITS_V)
    before = np.cumsum(probs) - probs
    allowed = set(np.flatnonzero(before < 0.7))  # the smallest prefix reaching 0.7
    got = many(SamplingParams(top_p=0.7, seed=12))
    assert set(got) <= allowed
    assert set(got) == allowed  # and each allowed token does come up in 4096 draws


def test_min_p_never_emits_excluded_tokens():
    probs = softmax(LOGITS_V)
    allowed = set(np.flatnonzero(probs >= 0.2 * probs.max()))
    got = many(SamplingParams(min_p=0.2, seed=13))
    assert set(got) == allowed


def test_top_k_then_top_p_then_min_p_with_temperature():
    scaled = LOGITS_V / 0.5
    top = np.argsort(-scaled)[:6]
    probs = softmax(scaled[top])
    before = np.cumsum(probs) - probs
    kept = top[before < 0.95]
    p_all = softmax(scaled)
    kept = [t for t in kept if p_all[t] >= 0.05 * p_all.max()]
    got = many(SamplingParams(temperature=0.5, top_k=6, top_p=0.95, min_p=0.05, seed=14))
    assert set(got) == set(kept)


def test_frequencies_match_softmax_chi_square():
    n = 4096
    probs = softmax(LOGITS_V / 1.3)
    counts = np.bincount(many(SamplingParams(temperature=1.3, seed=21), n), minlength=V)
    expected = probs * n
    # Pool the rare tail so every cell expects >= 5 draws, as the chi-square test requires.
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if not big.all():
        obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, expected[~big].sum())
    chi2 = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    # The 0.999 quantile of chi-square for these degrees of freedom (scipy-free table).
    critical = {7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59, 11: 31.26}[dof]
    assert dof >= 7, "the law is checked over most of the vocabulary"
    assert chi2 < critical, (chi2, dof)


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, V)).astype(np.float32)
    rows = [SamplingParams(temperature=0.7, top_k=4, seed=i, logprobs=True) for i in range(3)]
    tokens, logprobs = draw(rows, logits)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(logprobs, log_softmax[np.arange(3), tokens], rtol=1e-5)


def test_repetition_and_presence_penalties():
    logits = np.array([[3.0, 2.9, -1.0, -1.05] + [-9.0] * (V - 4)] * 3, np.float32)
    seen = np.zeros((3, V), np.int8)
    seen[:, 0] = sampling.SEEN_IN_PROMPT  # the best token was in the prompt
    seen[:, 2] = sampling.SEEN_IN_OUTPUT
    rows = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.1),  # 3.0 / 1.1 < 2.9
        SamplingParams(temperature=0.0, presence_penalty=5.0),  # output-only: 0 untouched
    ]
    tokens, _ = draw(rows, logits, seen)
    assert tokens.tolist() == [0, 1, 0]
    # A negative logit is multiplied, so a repeated one is pushed further down.
    logits2 = np.array([[-1.0, -1.05] + [-9.0] * (V - 2)], np.float32)
    seen2 = np.zeros((1, V), np.int8)
    seen2[0, 0] = sampling.SEEN_IN_OUTPUT
    tokens, _ = draw([SamplingParams(temperature=0.0, repetition_penalty=1.1)], logits2, seen2)
    assert tokens.tolist() == [1]
