"""k2jax.server pieces without a model: the reply decoder, stop strings, the default model's chat
tokenizer, the tool-choice prompts, and the Prometheus metrics."""

import types

import pytest
from k2_tokenizer_fixture import k2_test_tokenizer
from prometheus_client.parser import text_string_to_metric_families

from k2jax import default_model
from k2jax.chat.render import render
from k2jax.server.byte_tokenizer import ByteChatTokenizer
from k2jax.server.errors import APIError, field_path
from k2jax.server.metrics import Metrics
from k2jax.server.prompts import chat_prompt, sampling_params
from k2jax.server.protocol import ChatCompletionRequest
from k2jax.server.streaming import ChatTurnDecoder, StopStringMatcher, TextDecoder

TOKENIZERS = {"k2_format": k2_test_tokenizer, "default_model_bytes": ByteChatTokenizer}

ASSISTANT_WITH_CALLS = {
    "role": "assistant",
    "reasoning_content": "Two cities, so two lookups. 北京 later.",
    "content": "Looking them up <now>.",
    "tool_calls": [
        {
            "id": "functions.get_weather:3",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "functions.get_time:4",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz": "Europe/Rome"}'},
        },
    ],
}
EARLIER = [
    {"role": "user", "content": "weather?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": f"functions.f:{i}",
                "type": "function",
                "function": {"name": "f", "arguments": "{}"},
            }
            for i in range(3)
        ],
    },
    *[{"role": "tool", "tool_call_id": f"functions.f:{i}", "content": "ok"} for i in range(3)],
]


def generated_turn(tokenizer, message):
    """The ids a model writes for `message`: the rendered assistant turn after its header."""
    ids = render([*EARLIER, message], add_generation_prompt=False, tokenizer=tokenizer)
    start = len(ids) - 1 - ids[::-1].index(tokenizer.encode_special("<|im_assistant|>"))
    middle = ids.index(tokenizer.encode_special("<|im_middle|>"), start)
    return ids[middle + 1 :]


def decode_one_by_one(decoder, ids):
    deltas = []
    for token_id in ids:
        deltas += decoder.push(token_id)
    return deltas + decoder.finish()


@pytest.mark.parametrize("name", TOKENIZERS)
def test_rendered_tool_call_turn_decodes_to_the_message_token_by_token(name):
    tokenizer = TOKENIZERS[name]()
    ids = generated_turn(tokenizer, ASSISTANT_WITH_CALLS)
    decoder = ChatTurnDecoder(tokenizer, first_tool_index=3)
    deltas = decode_one_by_one(decoder, ids)
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    content = "".join(d.text for d in deltas if d.kind == "content")
    calls = [d.tool_call for d in deltas if d.kind == "tool_call"]
    assert reasoning == ASSISTANT_WITH_CALLS["reasoning_content"]
    assert content == ASSISTANT_WITH_CALLS["content"]
    assert calls == ASSISTANT_WITH_CALLS["tool_calls"]
    assert [d.tool_index for d in deltas if d.kind == "tool_call"] == [0, 1]
    assert decoder.tool_calls == calls
    specials = [n for n in tokenizer.special_ids if not n.startswith("<|reserved")]
    for delta in deltas:
        assert not any(special in delta.text for special in specials), delta


def test_tool_call_ids_count_across_the_conversation_whatever_the_model_wrote():
    tokenizer = ByteChatTokenizer()
    message = dict(
        ASSISTANT_WITH_CALLS,
        tool_calls=[
            dict(call, id=f"functions.{call['function']['name']}:0")
            for call in ASSISTANT_WITH_CALLS["tool_calls"]
        ],
    )
    decoder = ChatTurnDecoder(tokenizer, first_tool_index=7)
    deltas = decode_one_by_one(decoder, generated_turn(tokenizer, message))
    ids = [d.tool_call["id"] for d in deltas if d.kind == "tool_call"]
    assert ids == ["functions.get_weather:7", "functions.get_time:8"]


def test_stop_string_cuts_the_text_across_token_boundaries():
    tokenizer = ByteChatTokenizer()
    special = tokenizer.encode_special
    ids = [special("<think>"), *tokenizer.encode("think END not"), special("</think>")]
    ids += [*tokenizer.encode("a, b END c"), special("<|im_end|>")]
    decoder = ChatTurnDecoder(tokenizer, stop_strings=["END"])
    deltas = []
    stopped_at = None
    for position, token_id in enumerate(ids):
        deltas += decoder.push(token_id)
        if decoder.stop_string_matched:
            stopped_at = position
            break
    deltas += decoder.finish()
    # The byte "D" of the first "END" ends it; nothing after reaches the reply.
    assert tokenizer.decode(ids[: stopped_at + 1], skip_special=True).endswith("think END")
    assert "".join(d.text for d in deltas) == "think "
    assert all(d.kind == "reasoning" for d in deltas)


def test_stop_matcher_holds_back_only_what_could_start_a_stop_string():
    matcher = StopStringMatcher(["</answer>", "xyz"])
    assert matcher.push("abc</ans") == "abc"
    assert matcher.push("wer is") == "</answer is"
    assert matcher.push(" x") == " "
    assert matcher.push("y") == ""
    assert matcher.push("q") == "xyq"
    assert matcher.push("1</answer>2") == "1"
    assert matcher.matched
    assert matcher.push("more") == "" and matcher.flush() == ""


def test_text_decoder_skips_specials_and_stops():
    tokenizer = ByteChatTokenizer()
    ids = (
        tokenizer.encode("héllo ")
        + [tokenizer.encode_special("<think>")]
        + tokenizer.encode("wörld STOP tail")
    )
    decoder = TextDecoder(tokenizer, ["STOP"])
    text = ""
    for token_id in ids:
        text += decoder.push(token_id)
        if decoder.stopped:
            break
    text += decoder.finish()
    assert text == "héllo wörld "


def test_forced_named_call_is_parsed_as_if_the_model_wrote_it():
    tokenizer = ByteChatTokenizer()
    request = ChatCompletionRequest(
        model="m",
        messages=[*EARLIER, {"role": "user", "content": "and Paris?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    prompt = chat_prompt(request, tokenizer, default_model.EOS_ID)
    special = tokenizer.encode_special
    assert prompt.forced == [
        special("<think>"),
        special("</think>"),
        special("<|tool_calls_section_begin|>"),
        special("<|tool_call_begin|>"),
        *tokenizer.encode("functions.get_weather:3"),
        special("<|tool_call_argument_begin|>"),
    ]
    messages = [m.model_dump(exclude_unset=True) for m in request.messages]
    tools = [t.model_dump(exclude_unset=True) for t in request.tools]
    assert prompt.ids == render(messages, tools, tokenizer=tokenizer) + prompt.forced
    assert special("<|tool_call_end|>") in prompt.stop_token_ids
    decoder = ChatTurnDecoder(tokenizer, first_tool_index=3, forced_prefix=prompt.forced)
    generated = tokenizer.encode(' {"city": "Paris"} ') + [special("<|tool_call_end|>")]
    deltas = decode_one_by_one(decoder, generated)
    assert [d.kind for d in deltas] == ["tool_call"]
    assert deltas[0].tool_call["id"] == "functions.get_weather:3"
    assert deltas[0].tool_call["function"]["arguments"] == '{"city": "Paris"}'


def test_tool_choice_none_renders_without_tools_and_stops_at_a_section():
    tokenizer = ByteChatTokenizer()
    tools = [{"type": "function", "function": {"name": "f"}}]
    messages = [{"role": "user", "content": "hi"}]
    request = ChatCompletionRequest(model="m", messages=messages, tools=tools, tool_choice="none")
    prompt = chat_prompt(request, tokenizer, default_model.EOS_ID)
    assert prompt.ids == render(messages, tokenizer=tokenizer)
    assert prompt.forced == []
    assert tokenizer.encode_special("<|tool_calls_section_begin|>") in prompt.stop_token_ids
    required = ChatCompletionRequest(
        model="m", messages=messages, tools=tools, tool_choice="required"
    )
    prompt = chat_prompt(required, tokenizer, default_model.EOS_ID)
    assert prompt.ids[: -len(prompt.forced)] == render(messages, tools, tokenizer=tokenizer)
    assert prompt.forced[-1] == tokenizer.encode_special("<|tool_call_begin|>")


def test_bad_tool_choice_and_bad_sampling_name_the_field():
    tokenizer = ByteChatTokenizer()
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(APIError, match="needs tools") as caught:
        chat_prompt(
            ChatCompletionRequest(model="m", messages=messages, tool_choice="required"),
            tokenizer,
            None,
        )
    assert caught.value.param == "tool_choice"
    with pytest.raises(APIError, match="'g', which is not among") as caught:
        request = ChatCompletionRequest(
            model="m",
            messages=messages,
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        )
        chat_prompt(request, tokenizer, None)
    for field, value in (("temperature", -1.0), ("top_p", 0.0), ("min_p", 1.5), ("top_k", -5)):
        request = ChatCompletionRequest(model="m", messages=messages, **{field: value})
        with pytest.raises(APIError) as caught:
            sampling_params(request, logprobs=False)
        assert caught.value.status == 400 and caught.value.param == field, caught.value.message
    request = ChatCompletionRequest(model="m", messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(APIError, match=r"messages\[0\] \(role tool\): no 'tool_call_id'"):
        chat_prompt(request, tokenizer, None)


def test_field_paths_read_like_the_request():
    assert field_path(("body", "messages", 2, "role")) == "messages[2].role"
    assert field_path(("body", "tools", 0, "function", "parameters")) == (
        "tools[0].function.parameters"
    )


def test_byte_chat_tokenizer_text_never_encodes_to_a_special_id():
    tokenizer = ByteChatTokenizer()
    special = set(tokenizer.special_ids.values())
    assert max(special) < default_model.default_config().vocab_size
    every_character = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    assert not special.intersection(tokenizer.encode(every_character))
    text = "<|im_end|><think> 北京 😀 \ud800"
    assert not special.intersection(tokenizer.encode(text))
    assert tokenizer.decode(tokenizer.encode("<|im_end|> 北京 😀")) == "<|im_end|> 北京 😀"


def test_metrics_report_engine_state_and_request_latencies():
    stats = types.SimpleNamespace(
        queue_length=3,
        running=5,
        num_pages=100,
        pages_used=40,
        pages_cached=10,
        prefix_hit_tokens=30,
        prefix_lookup_tokens=120,
        prefill_tokens_computed=90,
    )
    metrics = Metrics(lambda: stats)
    metrics.observe_request(10.0, [10.5, 10.7, 10.9])
    metrics.requests.labels("chat", "stop").inc()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}

    def value(name, suffix=""):
        (sample,) = [s for s in families[name].samples if s.name == name + suffix]
        return sample.value

    assert value("k2jax_queue_length") == 3
    assert value("k2jax_running_requests") == 5
    assert value("k2jax_kv_pages_used") == 40
    assert value("k2jax_prefix_cache_hit_rate") == pytest.approx(30 / 120)
    assert value("k2jax_time_to_first_token_seconds", "_sum") == pytest.approx(0.5)
    assert value("k2jax_time_per_output_token_seconds", "_sum") == pytest.approx(0.2)
    assert value("k2jax_time_per_output_token_seconds", "_count") == 1
    stats.running = 0
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert value("k2jax_running_requests") == 0
