"""Scores a trained model on held-out generated conversations, through the real agent loop.

For each conversation the agent (greedy, the built-in tools) answers the last user request with
the earlier exchange, if any, as history. A conversation's tool use is right when the calls it
made are exactly the expected ones (same tools, arguments that validate against the declared
schema and equal the expected values; none for requests that need no tool); its answer is right
when the final content contains every expected string (the tools' results, the capital). The
held-out loss is the next-token loss on the assistant turns, as in training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jsonschema
import numpy as np

from k2jax.chat import tools as builtin
from k2jax.chat.agent import Agent
from k2jax.train import conversations, data

SCHEMAS = {d["function"]["name"]: d["function"]["parameters"] for d in builtin.DECLARATIONS}


def _same_arguments(got: dict, want: dict) -> bool:
    if set(got) != set(want):
        return False
    for key, value in want.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not isinstance(got[key], int | float) or abs(got[key] - value) > 1e-9:
                return False
        elif got[key] != value:
            return False
    return True


def calls_correct(made: Sequence[dict], expected: Sequence[tuple[str, dict]]) -> bool:
    """The calls made (OpenAI-style) are the expected ``(name, arguments)``, schema-valid."""
    if len(made) != len(expected):
        return False
    for call, (name, arguments) in zip(made, expected, strict=True):
        if call["function"]["name"] != name:
            return False
        try:
            got = json.loads(call["function"]["arguments"])
            jsonschema.validate(got, SCHEMAS[name])
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        if not _same_arguments(got, arguments):
            return False
    return True


def run_agent(model, tokenizer, conv: dict, max_new_tokens: int = 160) -> dict:
    """Answers ``conv``'s last request with the agent; ``{"calls", "answer", "stop_reason"}``."""
    start = conv["history"]
    agent = Agent(
        model,
        builtin.builtin_tools(),
        tokenizer=tokenizer,
        messages=conv["messages"][:start],
        max_steps=4,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
    )
    result = agent.run(conv["messages"][start]["content"])
    made = [
        call
        for message in agent.messages[start:]
        if message["role"] == "assistant"
        for call in message.get("tool_calls") or ()
    ]
    return {"calls": made, "answer": result.answer or "", "stop_reason": result.stop_reason}


def score(model, tokenizer, convs: Sequence[dict]) -> dict:
    """``{"tool_accuracy", "answer_accuracy", "per_kind"}`` over ``convs``."""
    tool_ok = answer_ok = 0
    per_kind: dict[str, list[int]] = {}
    for conv in convs:
        out = run_agent(model, tokenizer, conv)
        tools_right = calls_correct(out["calls"], conv["expected"]["calls"])
        answer_right = out["stop_reason"] == "answer" and all(
            s in out["answer"] for s in conv["expected"]["answer"]
        )
        tool_ok += tools_right
        answer_ok += answer_right
        kind = per_kind.setdefault(conv["kind"], [0, 0, 0])
        kind[0] += tools_right
        kind[1] += answer_right
        kind[2] += 1
    n = max(len(convs), 1)
    return {
        "tool_accuracy": tool_ok / n,
        "answer_accuracy": answer_ok / n,
        "per_kind": {
            k: {"tool": t / c, "answer": a / c, "n": c} for k, (t, a, c) in per_kind.items()
        },
    }


def heldout_rows(tokenizer, seed: int, count: int, seq_len: int, pad_id: int):
    """Packed rows (tokens, mask) of ``count`` held-out conversations."""
    convs = conversations.conversations(seed, count, split="eval")
    encoded = [data.encode_conversation(c, conversations.TOOLS, tokenizer) for c in convs]
    return data.pack_rows(encoded, seq_len, pad_id)


def masked_loss(logits_fn, tokens: np.ndarray, mask: np.ndarray, batch: int = 8) -> float:
    """Mean next-token loss over mask-1 targets; ``logits_fn(tokens [B, T]) -> [B, T, V]``."""
    total = count = 0.0
    for start in range(0, len(tokens), batch):
        rows, m = tokens[start : start + batch], mask[start : start + batch, 1:]
        logits = np.asarray(logits_fn(rows[:, :-1]), np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, rows[:, 1:, None], axis=-1)[..., 0]
        total += float((nll * m).sum())
        count += float(m.sum())
    return total / max(count, 1.0)


def calculator_set(seed: int, count: int) -> list[dict]:
    """A fixed set of held-out calculator conversations (no history)."""
    import random

    rng = random.Random(seed)
    out = []
    while len(out) < count:
        conv = conversations.conversation(rng, split="eval", kind="calculator")
        if conv["history"] == 0:
            out.append(conv)
    return out
