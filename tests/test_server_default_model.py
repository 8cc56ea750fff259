"""`python -m k2jax.serve` with no checkpoint serves the trained default model, whose replies call
tools: a full tool-call round trip through the real `openai` client.

The model's first reply is parsed into `tool_calls` (K2's `functions.NAME:IDX` id, the
calculator's schema-valid arguments) with its reasoning apart; the tool's result goes back as a
`tool` message and the next reply answers from it. Greedy, so the replies are the model's own
deterministic output, not scripted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import openai
import pytest

from k2jax.chat.tools import DECLARATIONS, calculator

QUESTION = "What is 347 * 29?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url():
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    args = ["--port", str(port), "--max-batch", "2", "--num-pages", "64", "--no-compile-cache"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "k2jax.serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up in 300 s"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(1)
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_the_default_model_calls_the_calculator_and_answers_from_its_result(server_url):
    client = openai.OpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": QUESTION}]
    tools = list(DECLARATIONS)
    first = client.chat.completions.create(
        model="k2jax-default", messages=messages, tools=tools, temperature=0, max_tokens=128
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.model_extra.get("reasoning_content")
    (call,) = choice.message.tool_calls
    assert call.id == "functions.calculator:0"
    assert call.function.name == "calculator"
    expression = json.loads(call.function.arguments)["expression"]
    result = calculator(expression)
    assert result == str(347 * 29)

    messages.append(
        {
            "role": "assistant",
            "content": choice.message.content or "",
            "reasoning_content": choice.message.model_extra["reasoning_content"],
            "tool_calls": [call.model_dump()],
        }
    )
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    second = client.chat.completions.create(
        model="k2jax-default", messages=messages, tools=tools, temperature=0, max_tokens=128
    )
    answer = second.choices[0]
    assert answer.finish_reason == "stop"
    assert not answer.message.tool_calls
    assert result in answer.message.content
    # The second prompt starts with the first: its full pages come from the prefix cache.
    assert second.usage.prompt_tokens_details.cached_tokens > 0
