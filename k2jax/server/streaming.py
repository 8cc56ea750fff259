"""Generated token ids -> the deltas a reply streams: reasoning, content and tool calls.

`ChatTurnDecoder` runs K2's `StreamParser` (k2jax.chat.parse) over the assistant's tokens: special
tokens only move the parser between states, so no special token's text ever reaches `content`
or `reasoning_content`. On top of the parser it

- feeds first the tokens the server forced into the turn (`tool_choice` required / named), so
  the reply is parsed as if the model had written them;
- renames each tool call `functions.NAME:IDX`, IDX counting calls across the whole
  conversation (the model's own index is not trusted, as in `k2jax.chat.Agent`);
- applies OpenAI `stop` strings to the visible text (reasoning and content): the text up to
  the first match is sent, the match and everything after it are not, and the request ends.
  Text that could be the start of a stop string is held back until the next token decides.

`TextDecoder` does the same for `/v1/completions`: plain text, special tokens skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from k2jax.chat.parse import StreamParser
from k2jax.chat.tokenizer import Tokenizer

DeltaKind = Literal["reasoning", "content", "tool_call"]


@dataclasses.dataclass(frozen=True)
class Delta:
    """A piece of the reply: text of `kind` reasoning/content, or one complete tool call
    (`tool_call` in OpenAI form, `tool_index` its position in this reply)."""

    kind: DeltaKind
    text: str = ""
    tool_call: dict[str, Any] | None = None
    tool_index: int = 0


class StopStringMatcher:
    """Finds OpenAI stop strings in streamed text, holding back a possible partial match."""

    def __init__(self, stop_strings: Sequence[str]):
        self._stops = tuple(stop_strings)
        self._pending = ""
        self.matched = False

    def push(self, text: str) -> str:
        """The text that is safe to send now (all of it up to a match, if one is found)."""
        if self.matched:
            return ""
        if not self._stops:
            return text
        text = self._pending + text
        first = min((position for s in self._stops if (position := text.find(s)) >= 0), default=-1)
        if first >= 0:
            self.matched = True
            self._pending = ""
            return text[:first]
        hold = max(
            (
                n
                for s in self._stops
                for n in range(min(len(s) - 1, len(text)), 0, -1)
                if s.startswith(text[len(text) - n :])
            ),
            default=0,
        )
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """Held-back text, released when the text it could have continued has ended."""
        text, self._pending = self._pending, ""
        return "" if self.matched else text


class ChatTurnDecoder:
    """One assistant turn's tokens -> `Delta`s (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        first_tool_index: int = 0,
        stop_strings: Sequence[str] = (),
        forced_prefix: Sequence[int] = (),
    ):
        self._parser = StreamParser(tokenizer)
        self._first_tool_index = first_tool_index
        self._stop = StopStringMatcher(stop_strings)
        self._text_kind: DeltaKind | None = None
        self.tool_calls: list[dict[str, Any]] = []
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self._finished = False
        self._forced: list[Delta] = self._convert(self._parser.feed(list(forced_prefix)))

    @property
    def stop_string_matched(self) -> bool:
        return self._stop.matched

    def push(self, token_ids: int | Iterable[int]) -> list[Delta]:
        """Deltas completed by these generated tokens (the forced prefix's come first)."""
        deltas, self._forced = self._forced, []
        if self._stop.matched:
            return deltas
        return deltas + self._convert(self._parser.feed(token_ids))

    def finish(self) -> list[Delta]:
        """Ends the turn: held-back text and a tool call the model left open. Idempotent."""
        if self._finished:
            return []
        self._finished = True
        deltas, self._forced = self._forced, []
        if not self._stop.matched:
            deltas += self._convert(self._parser.finish())
        deltas += self._flush_text()
        return deltas

    def _flush_text(self) -> list[Delta]:
        kind, text = self._text_kind, self._stop.flush()
        return self._record(kind, text) if kind and text else []

    def _record(self, kind: DeltaKind, text: str) -> list[Delta]:
        (self.reasoning if kind == "reasoning" else self.content).append(text)
        return [Delta(kind, text)]

    def _convert(self, events) -> list[Delta]:
        deltas: list[Delta] = []
        for event in events:
            if self._stop.matched:
                break
            if event.kind == "tool_call":
                deltas += self._flush_text()
                self._text_kind = None
                deltas.append(self._tool_call(event.tool_call))
                continue
            if event.kind != self._text_kind:
                deltas += self._flush_text()
                self._text_kind = event.kind
            text = self._stop.push(event.text)
            if text:
                deltas += self._record(event.kind, text)
        return deltas

    def _tool_call(self, parsed: dict[str, Any]) -> Delta:
        index = len(self.tool_calls)
        name = parsed["function"]["name"]
        call = {
            "id": f"functions.{name}:{self._first_tool_index + index}",
            "type": "function",
            "function": {"name": name, "arguments": parsed["function"]["arguments"]},
        }
        self.tool_calls.append(call)
        return Delta("tool_call", tool_call=call, tool_index=index)


class TextDecoder:
    """Completion tokens -> text deltas: specials skipped, stop strings applied."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()):
        self._decoder = tokenizer.stream_decoder(skip_special=True)
        self._stop = StopStringMatcher(stop_strings)
        self._finished = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string matched (the text ends before it)."""
        return self._stop.matched

    def push(self, token_id: int) -> str:
        return self._stop.push(self._decoder.push(token_id))

    def finish(self) -> str:
        """Text still held back (an unfinished character, a possible stop string). Idempotent."""
        if self._finished:
            return ""
        self._finished = True
        return self._stop.push(self._decoder.flush()) + self._stop.flush()


def token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token as logprobs report it: (text, its bytes); a special token by its name."""
    if tokenizer.is_special(token_id):
        name = tokenizer.special_name(token_id)
        return name, list(name.encode())
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)
