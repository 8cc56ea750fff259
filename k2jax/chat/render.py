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
        elif part.get("type", "text") == "text":
            parts.append(part.get("text", ""))
        else:
            raise ValueError(f"content part of type {part.get('type')!r} is not supported")
    return "".join(parts)


def _open_turn(message: Message) -> list[str]:
    role = message["role"]
    marker = {"user": "<|im_user|>", "assistant": "<|im_assistant|>"}.get(role, "<|im_system|>")
    return [Special(marker), message.get("name") or role, Special("<|im_middle|>")]


def _tool_call_section(tool_calls: Sequence[Mapping[str, Any]]) -> list[str]:
    segments: list[str] = [Special("<|tool_calls_section_begin|>")]
    for call in tool_calls:
        segments += [
            Special("<|tool_call_begin|>"),
            call["id"],
            Special("<|tool_call_argument_begin|>"),
            arguments_text(call["function"]["arguments"]),
            Special("<|tool_call_end|>"),
        ]
    segments.append(Special("<|tool_calls_section_end|>"))
    return segments


def _last_answer_index(messages: Sequence[Message]) -> int:
    """Index of the last assistant turn without tool calls (-1 if none)."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "assistant" and not messages[index].get("tool_calls"):
            return index
    return -1


def _preamble_segments(
    messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None
) -> list[str]:
    segments: list[str] = []
    if tools:
        segments += [Special("<|im_system|>"), "tool_declare", Special("<|im_middle|>")]
        segments += [tools_declaration_json(tools), Special("<|im_end|>")]
    if not messages or messages[0]["role"] != "system":
        segments += [Special("<|im_system|>"), "system", Special("<|im_middle|>")]
        segments += [DEFAULT_SYSTEM_PROMPT, Special("<|im_end|>")]
    return segments


def _message_segments(message: Message, keep_reasoning: bool) -> list[str]:
    segments = _open_turn(message)
    role = message["role"]
    if role == "assistant":
        reasoning = (message.get("reasoning_content") or "") if keep_reasoning else ""
        segments += [Special("<think>"), reasoning, Special("</think>"), content_text(message)]
        if message.get("tool_calls"):
            segments += _tool_call_section(message["tool_calls"])
    elif role == "tool":
        segments.append(f"## Return of {message['tool_call_id']}\n{content_text(message)}")
    else:
        segments.append(content_text(message))
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
        segments += _message_segments(message, keep_reasoning=index > last_answer)
    if add_generation_prompt:
        segments += _GENERATION_PROMPT_SEGMENTS
    return segments


def _segments_to_ids(segments: Sequence[str], tokenizer: Tokenizer) -> list[int]:
    # Adjacent text segments are joined before encoding, as the reference tokenizer sees them.
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
            segments = _message_segments(messages[index], keep_reasoning=index > last_answer)
            self._ids += _segments_to_ids(segments, self._tokenizer)
            self._messages.append(messages[index])
        return self._ids + self._generation_prompt if add_generation_prompt else list(self._ids)


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # transformers' `tojson`: no HTML escaping, non-ASCII kept, accepts `separators`.
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


def render_with_template(
    template_path: str | os.PathLike,
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Renders with a checkpoint's `chat_template.jinja`, in a sandbox, as transformers does.

    Tools are key-sorted first, as K2's tokenizer code does before calling the template.
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
        messages=list(messages), tools=sorted_tools, add_generation_prompt=add_generation_prompt
    )
