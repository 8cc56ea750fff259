"""Parses K2 Thinking's generated assistant turn into reasoning, content and tool calls.

Generation starts after `<|im_assistant|>assistant<|im_middle|>`; the model writes `<think>`
itself. Reasoning ends at `</think>` or at a tool-call section (the model sometimes opens the
section before closing its thinking, and those calls must still run). `<|im_end|>` (or
[EOS]/[EOT]) ends the turn. Special tokens never become text: they only move the parser
between states.

`StreamParser` consumes token ids one at a time (or text, split on special-token names) and
yields events; `parse` runs the same machine over a whole sequence, so streaming and whole-text
parsing agree for every split of the input.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from k2jax.chat.render import STRUCTURAL_TOKENS
from k2jax.chat.tokenizer import Tokenizer

END_OF_TURN_TOKENS = frozenset({"<|im_end|>", "[EOS]", "[EOT]"})
_TEXT_MODE_SPECIALS = (*STRUCTURAL_TOKENS, "[BOS]", "[EOS]", "[EOT]")

_MAX_SPECIAL_NAME_LENGTH = 64
EventKind = Literal["reasoning", "content", "tool_call"]


@dataclasses.dataclass(frozen=True)
class ParseEvent:
    """One streamed piece: a reasoning or content text delta, or a complete tool call."""

    kind: EventKind
    text: str = ""
    tool_call: dict[str, Any] | None = None


def function_name_from_call_id(call_id: str) -> str:
    """`functions.get_weather:3` -> `get_weather`: the part between the last `.` and the `:`."""
    name = call_id.rsplit(":", 1)[0] if ":" in call_id else call_id
    return name.rsplit(".", 1)[-1]


def make_tool_call(call_id: str, arguments: str) -> dict[str, Any]:
    """An OpenAI-style tool call; `arguments_error` is added when arguments are not JSON."""
    call: dict[str, Any] = {
        "id": call_id,
        "type": "function",
        "function": {"name": function_name_from_call_id(call_id), "arguments": arguments},
    }
    try:
        json.loads(arguments)
    except json.JSONDecodeError as error:
        call["arguments_error"] = f"arguments are not valid JSON: {error}"
    return call


@functools.lru_cache(maxsize=8)
def _special_matchers(names: tuple[str, ...]) -> tuple[re.Pattern[str], frozenset[str]]:
    """A regex finding any of `names` (longest first, so no name is cut short by a shorter one
    that prefixes it) and the set of their proper prefixes, for holding back split names."""
    alternatives = sorted(names, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(name) for name in alternatives))
    prefixes = frozenset(name[:n] for name in alternatives for n in range(1, len(name)))
    return pattern, prefixes


class StreamParser:
    """Incremental parser of one generated assistant turn.

    Feed token ids (`feed`) or text (`feed_text`, special tokens written by name); each call
    returns the events it completed. `finish()` closes a turn cut short; `result()` gives the
    parsed message at any point.
    """

    def __init__(self, tokenizer: Tokenizer | None = None):
        self._tokenizer = tokenizer
        self._decoder = tokenizer.stream_decoder(skip_special=True) if tokenizer else None
        special_names = tokenizer.special_ids if tokenizer else _TEXT_MODE_SPECIALS
        self._special_pattern, self._special_prefixes = _special_matchers(tuple(special_names))
        self._text_tail = ""
        self._reset()

    def _reset(self) -> None:
        self._state = "start"
        self._leading_whitespace = ""
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._tool_calls: list[dict[str, Any]] = []
        self._call_id: list[str] = []
        self._call_arguments: list[str] = []
        self.done = False

    def feed(self, token_ids: int | Iterable[int]) -> list[ParseEvent]:
        """Consumes one id or several; returns the events they complete."""
        if self._tokenizer is None:
            raise ValueError("StreamParser needs a tokenizer to parse token ids")
        if isinstance(token_ids, int):
            token_ids = (token_ids,)
        events: list[ParseEvent] = []
        for token_id in token_ids:
            if self._tokenizer.is_special(token_id):
                self._text(self._decoder.flush(), events)
                self._special(self._tokenizer.special_name(token_id), events)
            else:
                self._text(self._decoder.push(token_id), events)
        return events

    def feed_text(self, text: str) -> list[ParseEvent]:
        """Consumes generated text in which special tokens appear by name."""
        events: list[ParseEvent] = []
        text = self._text_tail + text
        position = 0
        for match in self._special_pattern.finditer(text):
            self._text(text[position : match.start()], events)
            self._special(match.group(), events)
            position = match.end()
        rest = text[position:]
        # A name may be cut between two chunks: hold back a tail that could start one.
        hold = next(
            (
                n
                for n in range(min(len(rest), _MAX_SPECIAL_NAME_LENGTH), 0, -1)
                if rest[-n:] in self._special_prefixes
            ),
            0,
        )
        self._text(rest[: len(rest) - hold], events)
        self._text_tail = rest[len(rest) - hold :]
        return events

    def finish(self) -> list[ParseEvent]:
        """Ends the input: flushes held text and completes a tool call left open."""
        events: list[ParseEvent] = []
        if self._decoder is not None:
            self._text(self._decoder.flush(), events)
        self._text(self._text_tail, events)
        self._text_tail = ""
        if self._state in ("call_id", "call_arguments"):
            self._close_call(events)
        return events

    def result(self) -> dict[str, Any]:
        """`{reasoning_content, content, tool_calls}` for what was consumed so far."""
        return {
            "reasoning_content": "".join(self._reasoning),
            "content": "".join(self._content),
            "tool_calls": [dict(call) for call in self._tool_calls],
        }

    def _text(self, text: str, events: list[ParseEvent]) -> None:
        if not text or self.done:
            return
        state = self._state
        if state == "start":
            if not text.strip():
                self._leading_whitespace += text
                return
            text, self._leading_whitespace = self._leading_whitespace + text, ""
            self._state = state = "content"
        if state == "reasoning":
            self._reasoning.append(text)
            events.append(ParseEvent("reasoning", text))
        elif state == "content":
            self._content.append(text)
            events.append(ParseEvent("content", text))
        elif state == "call_id":
            self._call_id.append(text)
        elif state == "call_arguments":
            self._call_arguments.append(text)
        # Text of the label after <|im_assistant|>, of other turns and between calls is dropped.

    def _close_call(self, events: list[ParseEvent]) -> None:
        call = make_tool_call("".join(self._call_id).strip(), "".join(self._call_arguments).strip())
        self._call_id, self._call_arguments = [], []
        self._tool_calls.append(call)
        events.append(ParseEvent("tool_call", tool_call=dict(call)))

    def _special(self, name: str, events: list[ParseEvent]) -> None:
        state = self._state
        if name == "<|im_assistant|>":
            # A new assistant turn (when given a whole transcript, the last one wins).
            self._reset()
            self._state = "label"
        elif name in ("<|im_user|>", "<|im_system|>") and (self.done or state == "start"):
            # Another party's turn in a transcript: skip it up to the next assistant turn.
            self._state = "other_turn"
        elif self.done or state == "other_turn":
            return
        elif state == "label":
            if name == "<|im_middle|>":
                self._state = "start"
        elif name in END_OF_TURN_TOKENS:
            if state in ("call_id", "call_arguments"):
                self._close_call(events)
            self.done = True
        elif name == "<think>" and state == "start":
            self._leading_whitespace = ""
            self._state = "reasoning"
        elif name == "</think>" and state in ("start", "reasoning"):
            self._state = "content"
        elif name == "<|tool_calls_section_begin|>" and state in ("start", "reasoning", "content"):
            self._state = "section"
        elif name == "<|tool_call_begin|>":
            if state in ("call_id", "call_arguments"):
                self._close_call(events)
            self._state = "call_id"
        elif name == "<|tool_call_argument_begin|>" and state == "call_id":
            self._state = "call_arguments"
        elif name == "<|tool_call_end|>" and state in ("call_id", "call_arguments"):
            self._close_call(events)
            self._state = "section"
        elif name == "<|tool_calls_section_end|>" and state != "content":
            if state in ("call_id", "call_arguments"):
                self._close_call(events)
            self._state = "content"
        # Any other special token here is out of place; it is dropped, never shown as text.


def parse(tokens_or_text: str | Sequence[int], tokenizer: Tokenizer | None = None) -> dict:
    """Parses a whole generated turn (token ids, which need `tokenizer`, or text).

    Returns `{reasoning_content, content, tool_calls}`; each tool call is
    `{id, type: "function", function: {name, arguments}}` with the raw argument string, plus
    `arguments_error` when that string is not valid JSON.
    """
    parser = StreamParser(tokenizer)
    if isinstance(tokens_or_text, str):
        parser.feed_text(tokens_or_text)
    else:
        parser.feed(list(tokens_or_text))
    parser.finish()
    return parser.result()
