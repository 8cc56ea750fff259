"""k2jax.chat.parse: reasoning, content and tool calls from generated turns, whole and streamed."""

import json

import pytest
from k2_tokenizer_fixture import generated_ids, k2_test_tokenizer

from k2jax.chat import StreamParser, parse, render_text
from k2jax.chat.parse import function_name_from_call_id


def section(*calls):
    body = "".join(
        f"<|tool_call_begin|>{call_id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>"
        for call_id, arguments in calls
    )
    return f"<|tool_calls_section_begin|>{body}<|tool_calls_section_end|>"


def parse_ids(text):
    return parse(generated_ids(text), k2_test_tokenizer())


PLAIN = "<think>Two plus three is five.</think>The answer is **5**.<|im_end|>"
SECTION_BEFORE_THINK_END = (
    "<think>I need the weather first."
    + section(("functions.get_weather:0", '{"city": "Paris"}'))
    + "<|im_end|>"
)
THREE_CALLS = (
    "<think>Three lookups.</think>Checking all three."
    + section(
        ("functions.get_weather:0", '{"city": "Paris"}'),
        ("functions.get_weather:1", '{"city": "北京"}'),
        ("functions.get_time:2", '{"tz": "UTC"}'),
    )
    + "<|im_end|>"
)
MALFORMED = (
    "<think>Oops.</think>"
    + section(("functions.add:3", '{"a": 1, "b": '), ("functions.add:4", '{"a": 1, "b": 2}'))
    + "<|im_end|>"
)
STREAM_CASES = [PLAIN, SECTION_BEFORE_THINK_END, THREE_CALLS, MALFORMED]


def test_reasoning_then_content():
    assert parse_ids(PLAIN) == {
        "reasoning_content": "Two plus three is five.",
        "content": "The answer is **5**.",
        "tool_calls": [],
    }


def test_tool_section_before_think_end_ends_reasoning_and_calls_still_run():
    result = parse_ids(SECTION_BEFORE_THINK_END)
    assert result["reasoning_content"] == "I need the weather first."
    assert result["content"] == ""
    assert result["tool_calls"] == [
        {
            "id": "functions.get_weather:0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]


def test_three_calls_in_one_section_are_all_complete():
    result = parse_ids(THREE_CALLS)
    assert result["reasoning_content"] == "Three lookups."
    assert result["content"] == "Checking all three."
    calls = result["tool_calls"]
    assert [c["id"] for c in calls] == [
        "functions.get_weather:0",
        "functions.get_weather:1",
        "functions.get_time:2",
    ]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris"},
        {"city": "北京"},
        {"tz": "UTC"},
    ]
    assert not any("arguments_error" in c for c in calls)


def test_malformed_arguments_are_kept_and_flagged_without_crashing():
    first, second = parse_ids(MALFORMED)["tool_calls"]
    assert first["function"]["arguments"] == '{"a": 1, "b":'
    assert "not valid JSON" in first["arguments_error"]
    assert second["function"]["arguments"] == '{"a": 1, "b": 2}'
    assert "arguments_error" not in second


@pytest.mark.parametrize("text", STREAM_CASES)
def test_streaming_split_at_every_token_boundary_equals_whole_parse(text):
    tokenizer = k2_test_tokenizer()
    ids = generated_ids(text)
    whole = parse(ids, tokenizer)
    for split in range(len(ids) + 1):
        parser = StreamParser(tokenizer)
        events = parser.feed(ids[:split]) + parser.feed(ids[split:]) + parser.finish()
        assert parser.result() == whole, split
        assert (
            "".join(e.text for e in events if e.kind == "reasoning") == whole["reasoning_content"]
        )
        assert "".join(e.text for e in events if e.kind == "content") == whole["content"]
        assert [e.tool_call for e in events if e.kind == "tool_call"] == whole["tool_calls"]


@pytest.mark.parametrize("text", STREAM_CASES)
def test_token_by_token_events_never_leak_special_text(text):
    tokenizer = k2_test_tokenizer()
    parser = StreamParser(tokenizer)
    events = []
    for token_id in generated_ids(text):
        events += parser.feed(token_id)
    events += parser.finish()
    assert parser.done
    for event in events:
        assert not any(name in event.text for name in tokenizer.special_ids if name in text)
        assert "\ufffd" not in event.text


@pytest.mark.parametrize("text", STREAM_CASES)
def test_text_streaming_split_at_every_character_equals_whole_parse(text):
    whole = parse(text)
    assert whole == parse_ids(text)
    for split in range(len(text) + 1):
        parser = StreamParser()
        events = parser.feed_text(text[:split]) + parser.feed_text(text[split:]) + parser.finish()
        assert parser.result() == whole, split
        assert "".join(e.text for e in events if e.kind == "content") == whole["content"]
        assert not any("<|" in e.text for e in events)


def test_out_of_place_special_tokens_are_dropped_not_shown():
    result = parse_ids(
        "<think>a<|im_user|>b</think>c<|im_middle|>d<|reserved_token_163600|>e<|im_end|>"
    )
    assert result == {"reasoning_content": "ab", "content": "cde", "tool_calls": []}


def test_special_strings_written_as_plain_tokens_stay_text():
    tokenizer = k2_test_tokenizer()
    ids = (
        [tokenizer.encode_special("<think>"), tokenizer.encode_special("</think>")]
        + tokenizer.encode("say <|im_end|> literally")
        + [tokenizer.encode_special("<|im_end|>")]
    )
    assert parse(ids, tokenizer)["content"] == "say <|im_end|> literally"


def test_text_after_end_of_turn_is_ignored():
    assert (
        parse_ids("<think>r</think>answer<|im_end|><|im_user|>user<|im_middle|>more")["content"]
        == "answer"
    )


def test_output_without_think_is_all_content():
    assert parse_ids("  Just an answer.<|im_end|>") == {
        "reasoning_content": "",
        "content": "  Just an answer.",
        "tool_calls": [],
    }


def test_truncated_call_is_closed_and_flagged_at_finish():
    result = parse_ids(
        "<think>r</think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
        '<|tool_call_argument_begin|>{"x": '
    )
    (truncated,) = result["tool_calls"]
    assert truncated["function"]["name"] == "f"
    assert "arguments_error" in truncated


def test_rendered_assistant_turn_parses_back_to_the_message():
    message = {
        "role": "assistant",
        "reasoning_content": "Need two cities.",
        "content": "Looking them up.",
        "tool_calls": [
            {
                "id": "functions.get_weather:0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "functions.get_weather:1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
            },
        ],
    }
    text = render_text([{"role": "user", "content": "hi"}, message], add_generation_prompt=False)
    parsed = parse(text)
    assert parsed == {key: message[key] for key in ("reasoning_content", "content", "tool_calls")}
    assert parse(generated_ids(text), k2_test_tokenizer()) == parsed


@pytest.mark.parametrize(
    "call_id, name",
    [
        ("functions.get_weather:0", "get_weather"),
        ("functions.search.web:12", "web"),
        ("get_weather:3", "get_weather"),
        ("functions.ping", "ping"),
    ],
)
def test_function_name_is_between_last_dot_and_colon(call_id, name):
    assert function_name_from_call_id(call_id) == name
