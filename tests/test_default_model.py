"""The shipped trained default model: it loads with its tokenizer, the sample CLI prints text
through that tokenizer, ``--chat`` runs a tool call end to end, and the agent answers the model
card's fixed held-out calculator set at the rate the card states."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from k2jax import default_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return default_model.load_default(dtype="float32")


def run_cli(args, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "k2jax.sample", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_load_default_has_its_tokenizer_and_fits_the_budget(model):
    tok = model.tokenizer
    assert tok.used_ids_end <= model.config.vocab_size
    assert model.config.eos_token_id == tok.encode_special("<|im_end|>")
    assert model.config.quantization.kind == "int4"
    size = sum(
        os.path.getsize(os.path.join(default_model.TRAINED_DIR, name))
        for name in os.listdir(default_model.TRAINED_DIR)
    )
    assert size <= 30 * 1024 * 1024


def test_sample_default_prints_text_that_decodes_through_the_tokenizer(model, tmp_path):
    proc = run_cli(["--max-new-tokens", "24", "--temperature", "0", "--json"], tmp_path)
    out = json.loads(proc.stdout)
    assert "trained default model" in out["model"]
    assert out["text_encoding"] == "tokenizer"
    tok = model.tokenizer
    assert out["prompt_ids"] == tok.encode("The capital of France is")
    assert out["text"] == tok.decode(out["new_ids"])
    assert "\ufffd" not in out["text"] and out["text"].strip()


def test_chat_runs_a_tool_call_end_to_end(tmp_path):
    proc = run_cli(
        ["--chat", "What is 347 * 29?", "--temperature", "0", "--max-new-tokens", "96"], tmp_path
    )
    lines = proc.stdout.splitlines()
    calls = [json.loads(x[len("[tool call] ") :]) for x in lines if x.startswith("[tool call] ")]
    assert calls and calls[0]["function"]["name"] == "calculator"
    assert json.loads(calls[0]["function"]["arguments"]) == {"expression": "347 * 29"}
    assert "[tool result] calculator: 10063" in lines
    assert any(x.startswith("[thinking] ") for x in lines)


def test_agent_answers_the_cards_calculator_set_at_the_stated_rate(model):
    from k2jax.train import evaluate

    with open(os.path.join(default_model.TRAINED_DIR, "evaluation.json")) as f:
        card = json.load(f)["calculator_set"]
    convs = evaluate.calculator_set(card["seed"], card["count"])
    scores = evaluate.score(model, model.tokenizer, convs)
    # Greedy decoding of the same questions: the card's rate is what this set must reach.
    assert scores["answer_accuracy"] >= card["answer_accuracy"]
    assert scores["tool_accuracy"] >= card["tool_accuracy"]
