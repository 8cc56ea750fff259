"""The HTTP server end to end: the real `openai` client against `k2jax.server` on 127.0.0.1.

One server (uvicorn in a thread, the default random model, one persistent engine) serves the
whole module. What it returns is compared with the engine run alone on the prompt that
`k2jax.chat.render` builds, token for token, so a random model is enough: the server must add
and lose nothing. The model's own tool calls are forced with `tool_choice` (a random model
never writes a well-formed one); the parsing of a known tool-call turn is unit-tested in
tests/test_server_streaming.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.request

import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from k2jax import default_model
from k2jax.chat.parse import parse
from k2jax.chat.render import render
from k2jax.server.app import create_app
from k2jax.server.byte_tokenizer import ByteChatTokenizer
from k2jax.serving.options import EngineConfig
from k2jax.serving.persistent_engine import EngineRequest, PersistentEngine, QueueFull
from k2jax.serving.sampling import SamplingParams

MODEL = "k2jax-default"
MAX_QUEUE = 64
MAX_BODY = 256 * 1024
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def engine_config():
    return EngineConfig(
        max_batch=8,
        page_size=16,
        num_pages=129,
        min_context_bucket=2048,  # one block-table width: two step programs to compile
        compiler_options=default_model.FAST_COMPILE,
    )


@contextlib.contextmanager
def serving(engine, tokenizer):
    """The app over ``engine`` served by uvicorn in a thread on 127.0.0.1; yields its base URL."""
    app = create_app(engine, tokenizer, model_name=MODEL, max_body_bytes=MAX_BODY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def served():
    engine = PersistentEngine(default_model.default_model(), engine_config(), max_queue=MAX_QUEUE)
    engine.start()
    tokenizer = ByteChatTokenizer()
    try:
        with serving(engine, tokenizer) as base:
            yield type(
                "Served",
                (),
                {"engine": engine, "tokenizer": tokenizer, "base": base, "url": base + "/v1"},
            )
    finally:
        engine.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=300)


def chat_stops(tokenizer):
    return (tokenizer.encode_special("<|im_end|>"), tokenizer.eos_id)


def alone(engine, prompt, max_new_tokens, stops=None, **sampling):
    """The tokens the engine gives `prompt` with nothing else submitted."""
    request = EngineRequest(
        tuple(prompt), max_new_tokens, SamplingParams(**sampling), stop_token_ids=stops
    )
    return [token.token for token in engine.submit(request)]


def wait_until_idle(engine, seconds=120):
    """Bounded wait for the engine to have no request; returns whether it got there."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.running == 0 and stats.queue_length == 0:
            return True
        time.sleep(0.05)
    return False


def get(url):
    """(status, body text) of a GET."""
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.status, response.read().decode()


def metric(served, name, **labels):
    text = get(served.base + "/metrics")[1]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def finished_chats(served):
    return sum(
        metric(served, "k2jax_requests_total", endpoint="chat", finish_reason=reason)
        for reason in ("stop", "length", "tool_calls")
    )


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime number, and say why (北京 😀)."},
]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 1234}])
def test_chat_reply_is_the_engine_alone_on_the_rendered_prompt(served, client, sampling):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        extra_body={"return_token_ids": True},
        **sampling,
    )
    prompt = render(MESSAGES, tokenizer=served.tokenizer)
    assert reply.model_extra["prompt_token_ids"] == prompt
    expected = alone(served.engine, prompt, 12, chat_stops(served.tokenizer), **sampling)
    (choice,) = reply.choices
    assert choice.model_extra["token_ids"] == expected
    turn = parse(expected, served.tokenizer)
    assert (choice.message.content or "") == turn["content"]
    assert (choice.message.model_extra.get("reasoning_content") or "") == turn["reasoning_content"]
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(expected)
    assert 0 <= reply.usage.prompt_tokens_details.cached_tokens <= len(prompt)
    stopped = expected[-1] in chat_stops(served.tokenizer)
    want = ("tool_calls" if turn["tool_calls"] else "stop") if stopped else "length"
    assert choice.finish_reason == want
    assert served.engine.all_pages_free_or_cached()


def test_streaming_chat_sends_the_same_reply_in_deltas_then_usage(served, client):
    request = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**request, extra_body={"return_token_ids": True})
    chunks = list(
        client.chat.completions.create(
            **request,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0] for c in chunks if c.choices]
    content = "".join(d.delta.content or "" for d in deltas)
    reasoning = "".join(d.delta.model_extra.get("reasoning_content") or "" for d in deltas)
    token_ids = [t for d in deltas for t in d.model_extra.get("token_ids") or ()]
    assert token_ids == whole.choices[0].model_extra["token_ids"]
    assert content == (whole.choices[0].message.content or "")
    assert reasoning == (whole.choices[0].message.model_extra.get("reasoning_content") or "")
    names = [n for n in served.tokenizer.special_ids]
    assert not any(n in content or n in reasoning for n in names)
    finishes = [d.finish_reason for d in deltas if d.finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(token_ids)
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_logprobs_are_the_engines(served, client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"return_token_ids": True},
    )
    prompt = reply.model_extra["prompt_token_ids"]
    request = EngineRequest(
        tuple(prompt),
        4,
        SamplingParams(temperature=0, logprobs=True),
        stop_token_ids=chat_stops(served.tokenizer),
        top_logprobs=3,
    )
    expected = list(served.engine.submit(request))
    entries = reply.choices[0].logprobs.content
    assert [e.logprob for e in entries] == pytest.approx([t.logprob for t in expected])
    for entry, token in zip(entries, expected, strict=True):
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(
            [lp for _, lp in token.top_logprobs]
        )
        assert len(entry.top_logprobs) == 3


def test_completions_with_text_and_token_ids_and_a_stop_string(served, client):
    tokenizer = served.tokenizer
    text_prompt = "The capital of France is"
    prompt = tokenizer.encode(text_prompt)
    expected = alone(served.engine, prompt, 24, temperature=0)
    expected_text = tokenizer.decode(expected, skip_special=True)
    reply = client.completions.create(model=MODEL, prompt=text_prompt, max_tokens=24, temperature=0)
    assert reply.choices[0].text == expected_text
    by_ids = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == expected_text
    assert by_ids.usage.prompt_tokens == len(prompt)
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected_text
    # A stop string taken from the middle of that text ends the reply before its first match.
    stop = expected_text[len(expected_text) // 2 :][:2]
    cut = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == expected_text[: expected_text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_tool_call_round_trip(served, client):
    """The conversation so far holds two calls; the model's next call (forced by a named
    tool_choice) is `functions.get_weather:2`; it goes back with its result and the prompt of
    the next turn is exactly `render` of the whole conversation."""
    tokenizer = served.tokenizer
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Two lookups.",
            "tool_calls": [
                {
                    "id": f"functions.get_weather:{i}",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": c})},
                }
                for i, c in enumerate(["Paris", "Rome"])
            ],
        },
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "21C sunny"},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "<|im_end|>18C"},
        {"role": "user", "content": "And Oslo?"},
    ]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        max_tokens=12,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body={"return_token_ids": True},
    )
    rendered = render(messages, TOOLS, tokenizer=tokenizer)
    forced = reply.model_extra["prompt_token_ids"][len(rendered) :]
    assert reply.model_extra["prompt_token_ids"][: len(rendered)] == rendered
    assert tokenizer.decode(forced) == (
        "<think></think><|tool_calls_section_begin|><|tool_call_begin|>"
        "functions.get_weather:2<|tool_call_argument_begin|>"
    )
    choice = reply.choices[0]
    expected = alone(
        served.engine,
        rendered + forced,
        12,
        (*chat_stops(tokenizer), tokenizer.encode_special("<|tool_call_end|>")),
        temperature=0,
    )
    assert choice.model_extra["token_ids"] == expected
    (call,) = choice.message.tool_calls
    assert call.id == "functions.get_weather:2" and call.function.name == "get_weather"
    assert (
        call.function.arguments
        == tokenizer.decode([t for t in expected if not tokenizer.is_special(t)]).strip()
    )
    want = (
        "tool_calls" if expected[-1] == tokenizer.encode_special("<|tool_call_end|>") else "length"
    )
    assert choice.finish_reason == want
    # Back with the result; tools declared, the model free to answer.
    assistant = choice.message.model_dump(exclude_none=True)
    result = {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": "-3C"}
    follow_up = [*messages, assistant, result]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=follow_up,
        tools=TOOLS,
        max_tokens=6,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    prompt = render(follow_up, TOOLS, tokenizer=tokenizer)
    assert reply.model_extra["prompt_token_ids"] == prompt
    assert reply.choices[0].model_extra["token_ids"] == alone(
        served.engine, prompt, 6, chat_stops(tokenizer), temperature=0
    )
    # The repeated conversation prefix is served from the prefix cache.
    assert reply.usage.prompt_tokens_details.cached_tokens >= 16


def test_tool_choice_none_and_required(served, client):
    tokenizer = served.tokenizer
    none = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=4,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert none.model_extra["prompt_token_ids"] == render(MESSAGES, tokenizer=tokenizer)
    assert not none.choices[0].message.tool_calls
    required = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=4,
        temperature=0,
    )
    assert len(required.choices[0].message.tool_calls) == 1


def test_streamed_tool_call_arrives_as_one_delta_with_its_id(served, client):
    request = dict(
        model=MODEL,
        messages=MESSAGES,
        tools=TOOLS,
        max_tokens=6,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True))
    calls = [
        c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls or ()
    ]
    (call,) = calls
    (expected,) = whole.choices[0].message.tool_calls
    assert (call.index, call.id, call.type) == (0, "functions.get_weather:0", "function")
    assert call.function.name == "get_weather"
    assert call.function.arguments == expected.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == (
        whole.choices[0].finish_reason
    )


def test_models_health_and_metrics(served, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert get(served.base + "/health")[0] == 200
    before = finished_chats(served)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    names = {f.name for f in text_string_to_metric_families(get(served.base + "/metrics")[1])}
    for name in (
        "k2jax_time_to_first_token_seconds",
        "k2jax_time_per_output_token_seconds",
        "k2jax_queue_length",
        "k2jax_running_requests",
        "k2jax_kv_pages_used",
        "k2jax_prefix_cache_hit_rate",
    ):
        assert name in names
    assert finished_chats(served) == before + 1
    assert metric(served, "k2jax_time_to_first_token_seconds_count") >= 1


def error_of(call):
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    "change, param, words",
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", ["wizard"]),
        ({"temperature": -1}, "temperature", [">= 0"]),
        ({"top_p": 1.5}, "top_p", ["(0, 1]"]),
        ({"max_tokens": 0}, "max_tokens", ["greater than or equal to 1"]),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools[0].function.parameters",
            ["JSON schema"],
        ),
        ({"n": 2}, "n", ["one choice"]),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "messages",
            ["messages[0] (role tool)", "tool_call_id"],
        ),
    ],
)
def test_bad_requests_are_400_naming_the_field(served, client, change, param, words):
    request = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **change}
    error = error_of(lambda: client.chat.completions.create(**request))
    assert error.status_code == 400
    assert error.body["param"] == param, error.body
    for word in words:
        assert word in error.body["message"], error.body


def test_prompt_longer_than_the_context_unknown_model_and_oversized_body(served, client):
    context = default_model.default_config().max_position_embeddings
    text = "x" * (context + 10)
    error = error_of(
        lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=2
        )
    )
    prompt_length = len(render([{"role": "user", "content": text}], tokenizer=served.tokenizer))
    assert error.status_code == 400 and error.body["code"] == "context_length_exceeded"
    assert str(prompt_length) in error.body["message"] and str(context) in error.body["message"]
    error = error_of(
        lambda: client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=context)
    )
    assert error.status_code == 400
    assert str(context) in error.body["message"] and str(context + 2) in error.body["message"]
    error = error_of(lambda: client.chat.completions.create(model="gpt-4", messages=MESSAGES))
    assert error.status_code == 404 and "gpt-4" in error.body["message"]
    huge = [{"role": "user", "content": "y" * (MAX_BODY + 1)}]
    error = error_of(lambda: client.chat.completions.create(model=MODEL, messages=huge))
    assert error.status_code == 413 and str(MAX_BODY) in error.body["message"]
    # Without a Content-Length (chunked), the bytes are counted as they arrive.
    body = json.dumps({"model": MODEL, "messages": huge}).encode()
    connection = http.client.HTTPConnection(served.base.removeprefix("http://"), timeout=60)
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=chunks,
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    response = connection.getresponse()
    assert response.status == 413
    assert str(MAX_BODY) in json.loads(response.read())["error"]["message"]
    connection.close()
    assert served.engine.all_pages_free_or_cached()


def test_a_full_queue_is_429():
    """An engine that is never started cannot drain its queue, so the queue stays full for as
    long as the request takes to arrive (a running engine would race the request: its eight
    running requests may finish first and make room)."""
    engine = PersistentEngine(default_model.default_model(), engine_config(), max_queue=2)
    try:
        for i in range(2):
            engine.submit(EngineRequest((1, 2, i), 4, SamplingParams(seed=i), ()))
        with pytest.raises(QueueFull):
            engine.submit(EngineRequest((1, 2, 3), 4, SamplingParams(seed=3), ()))
        with serving(engine, ByteChatTokenizer()) as base:
            # Were the request queued instead, it would wait forever: the timeout fails the test.
            client = openai.OpenAI(
                base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60
            )
            error = error_of(
                lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
            )
    finally:
        engine.close()
    assert error.status_code == 429 and error.body["code"] == "queue_full", error.status_code
    assert "queue is full" in error.body["message"]
    assert engine.stats().queue_length == 0 and engine.all_pages_free_or_cached()


def test_a_client_leaving_mid_stream_cancels_its_request(served, client):
    cancelled = metric(served, "k2jax_requests_cancelled_total")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=1500,
        temperature=1.0,
        seed=3,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    received = 0
    for chunk in stream:
        received += len(chunk.choices[0].model_extra.get("token_ids") or ()) if chunk.choices else 0
        if received >= 3:
            break
    stream.close()
    assert wait_until_idle(served.engine)
    assert served.engine.all_pages_free_or_cached()
    assert metric(served, "k2jax_requests_cancelled_total") == cancelled + 1
    generated = metric(served, "k2jax_requests_total", endpoint="chat", finish_reason="cancelled")
    assert generated >= 1


def test_a_client_gone_before_the_first_byte_has_its_request_cancelled(served):
    """The client's disconnect is already waiting when the streamed response starts and the
    transport yields on the response's first write, so Starlette cancels the response before
    it iterates the body even once (the relay never starts): the request must still be
    cancelled, not left to run its 1,500 tokens."""
    app = create_app(served.engine, served.tokenizer, model_name=MODEL, max_body_bytes=MAX_BODY)
    body = json.dumps(
        {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1500, "stream": True, "seed": 5}
    ).encode()
    incoming = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    sent = []

    async def send(message):
        await asyncio.sleep(0)  # a transport that yields on write (e.g. under flow control)
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # uvicorn's
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    assert not any(m.get("body") for m in sent if m["type"] == "http.response.body")
    assert wait_until_idle(served.engine)
    assert served.engine.all_pages_free_or_cached()
    families = text_string_to_metric_families(app.state.server.metrics.render().decode())
    samples = {
        (s.name, s.labels.get("finish_reason")): s.value for f in families for s in f.samples
    }
    assert samples[("k2jax_requests_cancelled_total", None)] == 1
    assert samples[("k2jax_requests_total", "cancelled")] == 1


CLIENTS = 64


def test_64_concurrent_streaming_clients_each_get_their_tokens_alone(served):
    tokenizer, engine = served.tokenizer, served.engine

    def request_of(i):
        sampling = {"temperature": 0} if i % 2 else {"temperature": 1.0, "seed": 1000 + i}
        messages = [{"role": "user", "content": f"client {i}: count to {i % 7}"}]
        return messages, sampling

    async def one(client, i):
        messages, sampling = request_of(i)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=5,
            stream=True,
            user=f"client-{i}",
            extra_body={"return_token_ids": True},
            **sampling,
        )
        tokens, finishes, ids = [], [], set()
        async for chunk in stream:
            ids.add(chunk.id)
            for choice in chunk.choices:
                tokens += choice.model_extra.get("token_ids") or ()
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        return tokens, finishes, ids

    async def all_clients():
        async with openai.AsyncOpenAI(
            base_url=served.url, api_key="unused", max_retries=0, timeout=600
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(CLIENTS)))

    threads_before = threading.active_count()
    requests_before = finished_chats(served)
    results = asyncio.run(all_clients())
    reply_ids = set()
    for i, (tokens, finishes, ids) in enumerate(results):
        messages, sampling = request_of(i)
        prompt = render(messages, tokenizer=tokenizer)
        assert tokens == alone(engine, prompt, 5, chat_stops(tokenizer), **sampling), i
        assert len(finishes) == 1 and len(ids) == 1, (i, finishes, ids)
        reply_ids |= ids
    assert len(reply_ids) == CLIENTS
    # Each request finished once (the runs alone went to the engine, not through the server).
    assert finished_chats(served) - requests_before == CLIENTS
    assert wait_until_idle(engine)
    assert engine.all_pages_free_or_cached()
    # Per-request relay threads are gone: the server holds nothing per finished request.
    deadline = time.monotonic() + 30
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads_before, [t.name for t in threading.enumerate()]
