"""Requests -> what the engine runs: prompt ids, forced tokens, stop ids and sampling.

Chat prompts are `k2jax.chat.render` of the messages and tools, exactly. `tool_choice`:

- `auto` (the default): the tools, if any, are declared; the model decides.
- `none`: the tools are not declared (the prompt is rendered without them), and generation also
  stops at `<|tool_calls_section_begin|>` / `<|tool_call_begin|>` should the model open a
  section anyway (finish_reason "stop"); the reply then has no tool calls.
- `required`: the assistant turn is started for the model with
  `<think></think><|tool_calls_section_begin|><|tool_call_begin|>` (the empty thinking block is
  what K2's template writes for a turn without reasoning), so it must write a call's id and
  arguments. It skips the model's reasoning for that turn.
- named function: as `required`, then `functions.NAME:IDX<|tool_call_argument_begin|>` too, so
  the model writes only that call's arguments; generation stops at `<|tool_call_end|>`.

The forced tokens are appended to the prompt the engine prefills (they count as prompt tokens)
and are fed to the reply's parser first, so the reply reads as if the model had written them.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from k2jax.chat.render import render
from k2jax.chat.tokenizer import Tokenizer
from k2jax.server.errors import APIError
from k2jax.server.protocol import ChatCompletionRequest, NamedToolChoice
from k2jax.serving.sampling import SamplingParams

SEED_RANGE = 2**32


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]  # rendered conversation + generation prompt + forced tokens
    forced: list[int]  # the forced tail of `ids` (tool_choice required / named)
    stop_token_ids: tuple[int, ...]
    first_tool_index: int  # tool calls already in the conversation: the next call's IDX


def _specials(tokenizer: Tokenizer, *names: str) -> list[int]:
    return [tokenizer.encode_special(name) for name in names]


def chat_prompt(
    request: ChatCompletionRequest, tokenizer: Tokenizer, eos_token_id: int | None
) -> ChatPrompt:
    """Renders the request; a malformed conversation or tool choice is a 400 naming it."""
    messages = [message.model_dump(exclude_unset=True) for message in request.messages]
    tools = [tool.model_dump(exclude_unset=True) for tool in request.tools or ()] or None
    choice = request.tool_choice or "auto"
    if choice not in ("none", "auto") and not tools:
        raise APIError(400, f"tool_choice {_choice_name(choice)} needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        declared = [tool["function"]["name"] for tool in tools]
        if choice.function.name not in declared:
            raise APIError(
                400,
                f"tool_choice names function {choice.function.name!r}, which is not among the "
                f"tools ({', '.join(declared)})",
                param="tool_choice",
            )
    try:
        ids = render(messages, None if choice == "none" else tools, tokenizer=tokenizer)
    except ValueError as error:
        raise APIError(400, str(error), param="messages") from None
    first_tool_index = sum(
        len(m.get("tool_calls") or ()) for m in messages if m.get("role") == "assistant"
    )
    stops = [tokenizer.encode_special("<|im_end|>")]
    stops += [t for t in (tokenizer.eos_id, eos_token_id) if t is not None and t not in stops]
    forced: list[int] = []
    if choice == "none":
        stops += _specials(tokenizer, "<|tool_calls_section_begin|>", "<|tool_call_begin|>")
    elif choice != "auto":
        forced = _specials(
            tokenizer, "<think>", "</think>", "<|tool_calls_section_begin|>", "<|tool_call_begin|>"
        )
        if isinstance(choice, NamedToolChoice):
            forced += tokenizer.encode(f"functions.{choice.function.name}:{first_tool_index}")
            forced += _specials(tokenizer, "<|tool_call_argument_begin|>")
            stops += _specials(tokenizer, "<|tool_call_end|>")
    return ChatPrompt(ids + forced, forced, tuple(stops), first_tool_index)


def _choice_name(choice: Any) -> str:
    return repr(choice.function.name) if isinstance(choice, NamedToolChoice) else repr(choice)


def sampling_params(request, logprobs: bool) -> SamplingParams:
    """The request's sampling, checked by `SamplingParams`; a bad value is a 400 naming it."""
    values: dict[str, Any] = {"logprobs": logprobs}
    for field in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"):
        value = getattr(request, field)
        if value is not None:
            values[field] = value
    if request.top_k is not None and request.top_k not in (0, -1):  # 0 / -1: disabled (vLLM)
        values["top_k"] = request.top_k
    values["seed"] = secrets.randbelow(SEED_RANGE) if request.seed is None else request.seed
    try:
        return SamplingParams(**values)
    except ValueError as error:
        message = str(error)
        field = message.removeprefix("SamplingParams.").split(" ", 1)[0]
        message = message.removeprefix("SamplingParams.")
        raise APIError(400, message, param=field if field in values else None) from None
