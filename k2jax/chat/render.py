"""Renders OpenAI-style messages in K2 Thinking's chat format (K2_REFERENCE.md, Chat format).

The conversation is first laid out as a sequence of segments, each either a special token (by
name) or plain text. `render_text` joins them into the exact string K2's template produces;
`render` maps the specials to their ids and encodes every run of text with `Tokenizer.encode`,
which never yields a special id, so message text containing `<|im_end|>` stays text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from k2jax.chat.tokenizer import Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

STRUCTURAL_TOKENS = (
    "<|im_user|>",
    "<|im_assistant|>",
    "<|im_system|>",
    "<|im_middle|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
)

Message = Mapping[str, Any]


class Special(str):
    """A segment that is a special token (its name), as opposed to a plain-text segment."""


def tools_declaration_json(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tool-declaration body: compact JSON, keys sorted at every depth, non-ASCII kept."""
    return json.dumps(list(tools), separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def arguments_text(arguments: Any) -> str:
    """Tool-call arguments as rendered: a string verbatim, anything else as JSON."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _as_text(value: Any) -> str:
    # What jinja's `{{ value }}` writes: strings as they are, anything else through str().
    return value if isinstance(value, str) else str(value)


def content_text(message: Message) -> str:
    """A message's content as text: a string, or the text parts of a list of content parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif part.get("type") == "image" or "image" in part or "image_url" in part:
            raise ValueError("image content parts are not supported (K2 Thinking reads text)")
        elif part.get("type", "text") == "text":
            parts.append(_as_text(part["text"]) if "text" in part else "")
        else:
            raise ValueError(f"content part of type {part.get('type')!r} is not supported")
    return "".join(parts)


# Names an assistant's reasoning arrives under; transformers' `apply_chat_template` copies the
# first that is not None into `reasoning_content`, which the template reads.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _reasoning(message: Message) -> Any:
    """The first of `REASONING_FIELDS` that is set (not None), or None."""
    return next((message[f] for f in REASONING_FIELDS if message.get(f) is not None), None)


def reasoning_text(message: Message) -> str:
    """An assistant message's reasoning, from the first of `REASONING_FIELDS` that is set."""
    reasoning = _reasoning(message)
    return "" if reasoning is None else _as_text(reasoning)


def _where(index: int, message: Message) -> str:
    return f"messages[{index}] (role {message.get('role')})"


def _open_turn(message: Message, where: str) -> list[str]:
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ValueError(f"{where}: no 'role' (a message needs role user, assistant, tool, ...)")
    marker = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}.get(role, "<|im_system|>")
    return [Special(marker), _as_text(message.get("name") or role), Special("<|im_middle|>")]


def _tool_call_section(tool_calls: Sequence[Mapping[str, Any]], where: str) -> list[str]:
    segments: list[str] = [Special("<|tool_calls_section_begin|>")]
    for number, call in enumerate(tool_calls):
        call_where = f"{where}: tool_calls[{number}]"
        if not isinstance(call, Mapping):
            raise ValueError(f"{call_where} is a {type(call).__name__}, not a dict")
        if call.get("id") is None:
            # The template would write an empty id, which no tool result can refer to.
            raise ValueError(
                f"{call_where} has no 'id' (e.g. 'functions.NAME:0'; tool results name it)"
            )
        function = call.get("function")
        if not isinstance(function, Mapping) or "arguments" not in function:
            raise ValueError(f"{call_where} has no 'function' with 'arguments'")
        segments += [
            Special("<|tool_call_begin|>"),
            _as_text(call["id"]),
            Special("<|tool_call_argument_begin|>"),
            arguments_text(function["arguments"]),
            Special("<|tool_call_end|>"),
        ]
    segments.append(Special("<|tool_calls_section_end|>"))
    return segments


def _last_answer_index(messages: Sequence[Message]) -> int:
    """Index of the last assistant turn without tool calls (-1 if none)."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if (
            isinstance(message, Mapping)
            and message.get("role") == "assistant"
            and not message.get("tool_calls")
        ):
            return index
    return -1


def _preamble_segments(
    messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None
) -> list[str]:
    segments: list[str] = []
    if tools:
        segments += [Special("<|im_system|>"), "tool_declare", Special("<|im_middle|>")]
        segments += [tools_declaration_json(tools), Special("<|im_end|>")]
    if not messages or not isinstance(messages[0], Mapping) or messages[0].get("role") != "system":
        segments += [Special("<|im_system|>"), "system", Special("<|im_middle|>")]
        segments += [DEFAULT_SYSTEM_PROMPT, Special("<|im_end|>")]
    return segments


def _message_segments(message: Message, keep_reasoning: bool, index: int) -> list[str]:
    """Segments of `messages[index]`; a malformed message is a ValueError naming it."""
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{index}] is a {type(message).__name__}, not a message dict")
    where = _where(index, message)
    segments = _open_turn(message, where)
    role = message["role"]
    try:
        content = content_text(message)
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{where}: bad 'content': {error}") from None
    if role == "assistant":
        reasoning = reasoning_text(message) if keep_reasoning else ""
        segments += [Special("<think>"), reasoning, Special("</think>"), content]
        if message.get("tool_calls"):
            segments += _tool_call_section(message["tool_calls"], where)
    elif role == "tool":
        if message.get("tool_call_id") is None:
            # The template would write "## Return of " and no id: the result matches no call.
            raise ValueError(f"{where}: no 'tool_call_id' (the 'id' of the call it answers)")
        segments.append(f"## Return of {_as_text(message['tool_call_id'])}\n{content}")
    else:
        segments.append(content)
    segments.append(Special("<|im_end|>"))
    return segments


_GENERATION_PROMPT_SEGMENTS = (Special("<|im_assistant|>"), "assistant", Special("<|im_middle|>"))


def render_segments(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> list[str]:
    """The conversation as segments: `Special` names and plain-text strings, in order."""
    segments = _preamble_segments(messages, tools)
    # Reasoning of turns up to and including the last plain answer is dropped; the model was
    # trained with it removed there and kept in the tool-call chain after it.
    last_answer = _last_answer_index(messages)
    for index, message in enumerate(messages):
        segments += _message_segments(message, keep_reasoning=index > last_answer, index=index)
    if add_generation_prompt:
        segments += _GENERATION_PROMPT_SEGMENTS
    return segments


def _segments_to_ids(segments: Sequence[str], tokenizer: Tokenizer) -> list[int]:
    # Adjacent text segments are joined before encoding, as the reference tokenizer sees them.
    # Each run of text between two specials is one `encode` call (which cuts very long runs as
    # Moonshot's `encode()` does), as in transformers' `tokenizer(prompt)` and
    # `apply_chat_template(..., tokenize=True)`, which split the prompt at special tokens first.
    ids: list[int] = []
    pending_text: list[str] = []
    for segment in segments:
        if isinstance(segment, Special):
            if pending_text:
                ids += tokenizer.encode("".join(pending_text))
                pending_text = []
            ids.append(tokenizer.encode_special(segment))
        else:
            pending_text.append(segment)
    if pending_text:
        ids += tokenizer.encode("".join(pending_text))
    return ids


def render_text(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The exact prompt string K2 Thinking's chat template produces for `messages`."""
    return "".join(render_segments(messages, tools, add_generation_prompt))


def render(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    *,
    tokenizer: Tokenizer,
) -> list[int]:
    """Prompt token ids: structural tokens as special ids, all message text as plain text."""
    return _segments_to_ids(render_segments(messages, tools, add_generation_prompt), tokenizer)


class IncrementalRenderer:
    """`render` for a conversation that grows by appending, encoding only the new messages.

    A turn's tokens depend only on the message and on whether its reasoning is kept, and every
    turn starts and ends with a special token, so earlier turns can be reused as long as the
    earlier message objects are the same ones (compared by identity: edit a conversation by
    replacing a message dict, not by changing it in place) and the last plain answer has not
    moved. Anything else re-renders from scratch. Holds one prompt's ids, never one per call.
    """

    def __init__(self, tokenizer: Tokenizer, tools: Sequence[Mapping[str, Any]] | None = None):
        self._tokenizer = tokenizer
        self._tools = tools
        self._messages: list[Message] = []
        self._ids: list[int] = []
        self._last_answer: int | None = None
        self._generation_prompt = _segments_to_ids(_GENERATION_PROMPT_SEGMENTS, tokenizer)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """The same ids as `render(messages, tools, add_generation_prompt, tokenizer=...)`."""
        last_answer = _last_answer_index(messages)
        reusable = (
            self._last_answer == last_answer
            and 0 < len(self._messages) <= len(messages)
            and all(old is new for old, new in zip(self._messages, messages, strict=False))
        )
        if not reusable:
            self._ids = _segments_to_ids(_preamble_segments(messages, self._tools), self._tokenizer)
            self._messages = []
            self._last_answer = last_answer
        for index in range(len(self._messages), len(messages)):
            segments = _message_segments(
                messages[index], keep_reasoning=index > last_answer, index=index
            )
            self._ids += _segments_to_ids(segments, self._tokenizer)
            self._messages.append(messages[index])
        return self._ids + self._generation_prompt if add_generation_prompt else list(self._ids)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators=None,
    sort_keys: bool = False,
) -> str:
    # transformers' `tojson`: no HTML escaping, non-ASCII kept, accepts `separators`.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _as_apply_chat_template_passes(message: Message) -> dict[str, Any]:
    # transformers' apply_chat_template drops keys whose value is None, then copies the first
    # reasoning field that is set into `reasoning_content` (and `thinking`).
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = _reasoning(message)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_with_template(
    template_path: str | os.PathLike,
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Renders with a checkpoint's `chat_template.jinja`, in a sandbox, as transformers does.

    Tools are key-sorted first, as K2's tokenizer code does before calling the template; messages
    are passed as transformers' `apply_chat_template` passes them (None-valued keys dropped,
    `thinking` / `reasoning` copied into `reasoning_content`).
    """
    import jinja2.sandbox

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    with open(template_path) as file:
        template = environment.from_string(file.read())
    sorted_tools = json.loads(json.dumps(list(tools), sort_keys=True)) if tools else None
    return template.render(
        messages=[_as_apply_chat_template_passes(message) for message in messages],
        tools=sorted_tools,
        add_generation_prompt=add_generation_prompt,
    )
