"""The `--chat` mode of `python -m k2jax.sample`: one user turn, streamed, reasoning shown apart.

Reasoning is printed dim behind a `[thinking]` marker, the answer behind `[answer]`, and each
parsed tool call as one JSON line behind `[tool call]`. Declared tools (`--tools tools.json`)
are only shown to the model; nothing is executed here (the `Agent` runs tools).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from k2jax.chat.agent import StreamingModel
from k2jax.chat.parse import StreamParser
from k2jax.chat.render import render
from k2jax.chat.tokenizer import Tokenizer
from k2jax.serving.options import GenerateOptions

_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `--chat PROMPT`, `--system TEXT` and `--tools tools.json` to `parser`."""
    group = parser.add_argument_group("chat")
    group.add_argument(
        "--chat",
        metavar="PROMPT",
        default=None,
        help="render PROMPT as a K2 chat user turn and stream the reply",
    )
    group.add_argument("--system", default=None, help="system prompt (default: K2's own)")
    group.add_argument(
        "--tools",
        metavar="TOOLS_JSON",
        default=None,
        help="JSON file with a list of OpenAI-style tool declarations to show the model",
    )


def load_tool_declarations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a JSON list of tool declarations (or `{"tools": [...]}`); bare function dicts
    are wrapped as `{"type": "function", "function": ...}`. A missing or malformed file is a
    `ValueError` naming it (`--tools PATH: ...`)."""
    try:
        with open(path, encoding="utf-8") as file:
            tools = json.load(file)
    except OSError as e:
        raise ValueError(f"--tools {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"--tools {path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    if isinstance(tools, dict):
        tools = tools.get("tools", [tools])
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(
            f"--tools {path}: expected a JSON list of tool declarations (objects), got "
            f"{type(tools).__name__}"
        )
    return [
        tool if "function" in tool else {"type": "function", "function": tool} for tool in tools
    ]


def chat_prompt_ids(
    tokenizer: Tokenizer, prompt: str, system: str | None, tools: list[dict[str, Any]] | None
) -> list[int]:
    """The token ids of one user turn (after `system`, with `tools` declared), ready for the
    assistant's reply."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    return render(messages, tools or None, tokenizer=tokenizer)


def run_chat(
    model: StreamingModel,
    tokenizer: Tokenizer,
    *,
    prompt: str,
    system: str | None = None,
    tools_json_path: str | os.PathLike | None = None,
    max_new_tokens: int,
    options: GenerateOptions | None = None,
    stream: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Renders one user turn, streams the model's reply to `stream`, returns the parsed turn
    (`{reasoning_content, content, tool_calls}`)."""
    tools = load_tool_declarations(tools_json_path) if tools_json_path else None
    prompt_ids = chat_prompt_ids(tokenizer, prompt, system, tools)
    return stream_reply(model, tokenizer, prompt_ids, max_new_tokens, options, stream)


def stream_reply(
    model: StreamingModel,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    max_new_tokens: int,
    options: GenerateOptions | None = None,
    stream: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Streams the reply to an already rendered prompt (`chat_prompt_ids`) to `stream`, reasoning
    shown apart and tool calls as JSON lines; returns the parsed turn."""
    stop_token_ids = [tokenizer.encode_special("<|im_end|>")]
    if tokenizer.eos_id is not None:
        stop_token_ids.append(tokenizer.eos_id)
    options = GenerateOptions.of(options, stop_token_ids=stop_token_ids)
    use_color = hasattr(stream, "isatty") and stream.isatty()
    dim, reset = (_DIM, _RESET) if use_color else ("", "")
    parser = StreamParser(tokenizer)
    section = None

    def show(event) -> None:
        nonlocal section
        if event.kind == "tool_call":
            call = {key: event.tool_call[key] for key in ("id", "type", "function")}
            if "arguments_error" in event.tool_call:
                call["arguments_error"] = event.tool_call["arguments_error"]
            stream.write(f"\n[tool call] {json.dumps(call, ensure_ascii=False)}")
            section = "tool_call"
            return
        if event.kind != section:
            prefix = "\n" if section is not None else ""
            label = "[thinking] " if event.kind == "reasoning" else "[answer] "
            stream.write(f"{reset if section == 'reasoning' else ''}{prefix}")
            stream.write(f"{dim}{label}" if event.kind == "reasoning" else label)
            section = event.kind
        stream.write(event.text)
        stream.flush()

    generation = model.generate_stream([prompt_ids], max_new_tokens, options)
    try:
        for step_tokens in generation:
            for _, token_id, *_ in step_tokens:
                for event in parser.feed(token_id):
                    show(event)
            if parser.done:
                break
    finally:
        close = getattr(generation, "close", None)
        if close is not None:
            close()
    for event in parser.finish():
        show(event)
    stream.write(f"{reset if section == 'reasoning' else ''}\n")
    stream.flush()
    return parser.result()
