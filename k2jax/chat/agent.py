"""An agent loop for K2 Thinking: generate, parse, run tools, feed results back, repeat.

Each step renders the whole conversation, streams one assistant turn from the model, parses its
reasoning and tool calls, runs the calls and appends the assistant turn (with its
`reasoning_content`, which K2 needs back during a tool-call chain) and one tool message per
call. The loop ends at an answer without tool calls or when a budget runs out.

Every failure of a call (unknown tool, arguments that are not JSON or break the declared
schema, a tool that raises) becomes an error tool result the model reads; the loop goes on.
Tool output is data: it is turned into text with `str` or `json.dumps`, never evaluated.

The agent keeps only the message list between steps, so memory grows with the conversation's
text and nothing else.

The model is anything with `generate_stream(prompts, max_new_tokens, options)` (options: a
`k2jax.serving.options.GenerateOptions`) yielding, per decode step, a list of
`(prompt_index, token_id)` pairs.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jsonschema

from k2jax.chat.parse import ParseEvent, StreamParser
from k2jax.chat.render import IncrementalRenderer
from k2jax.chat.tokenizer import Tokenizer
from k2jax.serving.options import GenerateOptions


class StreamingModel(Protocol):
    """The generation interface the agent and the chat CLI call."""

    def generate_stream(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        options: GenerateOptions | None = None,
    ) -> Iterator[list[tuple[int, int]]]: ...


@dataclasses.dataclass(frozen=True)
class Tool:
    """A callable with its OpenAI-style declaration (`{"type": "function", "function": ...}`)."""

    declaration: dict[str, Any]
    function: Callable[..., Any]

    @property
    def parameters(self) -> dict[str, Any]:
        return self.declaration["function"].get("parameters", {"type": "object"})


@dataclasses.dataclass
class AgentResult:
    """How a `run` ended. `stop_reason` is "answer", "max_steps", "max_total_tokens",
    "max_seconds" or "max_new_tokens" (a turn cut off mid-generation, kept in `partial`)."""

    stop_reason: str
    answer: str | None
    reasoning: str | None
    steps: int
    tool_calls: int
    generated_tokens: int
    partial: dict[str, Any] | None = None


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _annotation_schema(annotation: Any) -> dict[str, Any]:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_annotation_schema(arg) for arg in args]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if annotation is list or origin in (list, tuple, Sequence):
        return {"type": "array", **({"items": _annotation_schema(args[0])} if args else {})}
    if annotation is dict or origin in (dict, Mapping):
        return {"type": "object"}
    return {}


def schema_from_signature(function: Callable[..., Any]) -> dict[str, Any]:
    """A JSON schema for a callable's keyword arguments, from its signature and annotations."""
    hints = typing.get_type_hints(function)
    properties: dict[str, Any] = {}
    required = []
    accepts_extra = False
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_extra = True
            continue
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            continue
        properties[name] = _annotation_schema(hints.get(name, parameter.annotation))
        if parameter.default is inspect.Parameter.empty:
            required.append(name)
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": accepts_extra,
    }


def make_tool(name: str, spec: Callable[..., Any] | tuple[dict, Callable[..., Any]]) -> Tool:
    """A `Tool` from a bare callable (schema derived from its signature, description from its
    docstring) or a `(schema, callable)` pair, where the schema is a full declaration, a
    `{name, description, parameters}` function dict, or the parameters schema alone."""
    if callable(spec):
        function, schema = spec, None
    else:
        schema, function = spec
    if schema is None:
        description = inspect.getdoc(function) or ""
        declaration_function = {
            "name": name,
            "description": description.split("\n\n")[0],
            "parameters": schema_from_signature(function),
        }
    elif schema.get("type") == "function" and "function" in schema:
        declaration_function = dict(schema["function"])
    elif "parameters" in schema:
        declaration_function = dict(schema)
    else:
        declaration_function = {"name": name, "parameters": schema}
    declaration_function["name"] = name
    jsonschema.validators.validator_for(declaration_function.get("parameters", {})).check_schema(
        declaration_function.get("parameters", {})
    )
    return Tool({"type": "function", "function": declaration_function}, function)


def tool_output_text(output: Any) -> str:
    """Tool output as message text: strings as they are, anything else as JSON (or `str`)."""
    if isinstance(output, str):
        return output
    try:
        return json.dumps(output, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(output)


class Agent:
    """Runs K2 Thinking with tools until it answers or a budget runs out.

    `tools` maps a name to a callable or to `(schema, callable)`. Budgets: `max_steps` model
    turns per `run`, `max_new_tokens` per turn, `max_total_tokens` generated per `run`,
    `max_seconds` wall time per `run`. `messages` resumes a conversation; `system` sets the
    system prompt of a new one (ignored when `messages` are given). `on_event` receives every
    `ParseEvent` and, after each call, the tool message dict, as they happen.
    """

    def __init__(
        self,
        model: StreamingModel,
        tools: Mapping[str, Callable[..., Any] | tuple[dict, Callable[..., Any]]] | None = None,
        *,
        tokenizer: Tokenizer,
        messages: Sequence[dict[str, Any]] | None = None,
        system: str | None = None,
        max_steps: int = 64,
        max_new_tokens: int = 16384,
        max_total_tokens: int | None = None,
        max_seconds: float | None = None,
        options: GenerateOptions | None = None,
        on_event: Callable[[ParseEvent | dict[str, Any]], None] | None = None,
        **generate_keywords: Any,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.tools = {name: make_tool(name, spec) for name, spec in (tools or {}).items()}
        self.messages: list[dict[str, Any]] = [dict(message) for message in messages or []]
        if system is not None and not self.messages:
            self.messages.append({"role": "system", "content": system})
        self.max_steps = max_steps
        self.max_new_tokens = max_new_tokens
        self.max_total_tokens = max_total_tokens
        self.max_seconds = max_seconds
        # Sampling and engine knobs (temperature=..., seed=..., ...: GenerateOptions.KEYWORDS);
        # a turn stops at <|im_end|> (and the tokenizer's eos).
        stops = [tokenizer.encode_special("<|im_end|>")]
        if tokenizer.eos_id is not None:
            stops.append(tokenizer.eos_id)
        self.options = GenerateOptions.of(options, **generate_keywords, stop_token_ids=stops)
        self.on_event = on_event
        self._renderer = IncrementalRenderer(tokenizer, self.tool_declarations or None)

    @property
    def tool_declarations(self) -> list[dict[str, Any]]:
        """The tools as declared to the model, in the order given."""
        return [tool.declaration for tool in self.tools.values()]

    def tool_call_count(self) -> int:
        """Tool calls made so far in the conversation (the next call's IDX)."""
        return sum(
            len(m.get("tool_calls") or ()) for m in self.messages if m["role"] == "assistant"
        )

    def run(self, user_message: str | None = None) -> AgentResult:
        """Adds `user_message` (if given), then runs model turns and tools until an answer or a
        budget. Completed turns and tool results are appended to `self.messages`; a turn cut
        off by a budget is not (it is returned in `AgentResult.partial`)."""
        if user_message is not None:
            self.messages.append({"role": "user", "content": user_message})
        started = time.monotonic()
        generated = calls = 0
        for step in range(1, self.max_steps + 1):
            token_budget = self.max_new_tokens
            if self.max_total_tokens is not None:
                token_budget = min(token_budget, self.max_total_tokens - generated)
            if token_budget <= 0:
                return AgentResult("max_total_tokens", None, None, step - 1, calls, generated)
            if self.max_seconds is not None and time.monotonic() - started >= self.max_seconds:
                return AgentResult("max_seconds", None, None, step - 1, calls, generated)
            turn, new_tokens, finished, out_of_time = self._generate_turn(token_budget, started)
            generated += new_tokens
            if not finished:
                if out_of_time:
                    reason = "max_seconds"
                elif token_budget < self.max_new_tokens:
                    reason = "max_total_tokens"
                else:
                    reason = "max_new_tokens"
                return AgentResult(reason, None, None, step, calls, generated, partial=turn)
            tool_calls = turn["tool_calls"]
            assistant_message: dict[str, Any] = {
                "role": "assistant",
                "content": turn["content"],
                "reasoning_content": turn["reasoning_content"],
            }
            if not tool_calls:
                self.messages.append(assistant_message)
                return AgentResult(
                    "answer", turn["content"], turn["reasoning_content"], step, calls, generated
                )
            first_index = self.tool_call_count()
            assistant_message["tool_calls"] = [
                self._canonical_call(call, first_index + offset)
                for offset, call in enumerate(tool_calls)
            ]
            self.messages.append(assistant_message)
            for call, parsed_call in zip(assistant_message["tool_calls"], tool_calls, strict=True):
                result_message = {
                    "role": "tool",
                    "tool_call_id": call["id"],
                    "name": call["function"]["name"],
                    "content": self._call_tool(call, parsed_call.get("arguments_error")),
                }
                self.messages.append(result_message)
                calls += 1
                if self.on_event is not None:
                    self.on_event(result_message)
        return AgentResult("max_steps", None, None, self.max_steps, calls, generated)

    @staticmethod
    def _canonical_call(call: Mapping[str, Any], index: int) -> dict[str, Any]:
        # Ids count calls across the conversation, whatever index the model wrote.
        name = call["function"]["name"]
        return {
            "id": f"functions.{name}:{index}",
            "type": "function",
            "function": {"name": name, "arguments": call["function"]["arguments"]},
        }

    def _generate_turn(
        self, token_budget: int, started: float
    ) -> tuple[dict[str, Any], int, bool, bool]:
        prompt = self._renderer.render(self.messages)
        parser = StreamParser(self.tokenizer)
        stream = self.model.generate_stream([prompt], token_budget, self.options)
        new_tokens, out_of_time = 0, False
        try:
            for step_tokens in stream:
                for _, token_id, *_ in step_tokens:
                    new_tokens += 1
                    for event in parser.feed(token_id):
                        if self.on_event is not None:
                            self.on_event(event)
                if parser.done:
                    break
                if self.max_seconds is not None and time.monotonic() - started >= self.max_seconds:
                    out_of_time = True
                    break
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        for event in parser.finish():
            if self.on_event is not None:
                self.on_event(event)
        return parser.result(), new_tokens, parser.done, out_of_time

    def _call_tool(self, call: Mapping[str, Any], arguments_error: str | None) -> str:
        name = call["function"]["name"]
        tool = self.tools.get(name)
        if tool is None:
            available = ", ".join(sorted(self.tools)) or "none"
            return f"Error: unknown tool {name!r}. Available tools: {available}."
        if arguments_error is not None:
            return f"Error: {arguments_error}. Send the arguments as one JSON object."
        arguments = json.loads(call["function"]["arguments"])
        if not isinstance(arguments, dict):
            return f"Error: arguments must be a JSON object, got {type(arguments).__name__}."
        validator_class = jsonschema.validators.validator_for(tool.parameters)
        errors = sorted(validator_class(tool.parameters).iter_errors(arguments), key=str)
        if errors:
            details = "; ".join(
                f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors
            )
            return f"Error: arguments do not match the schema of {name}: {details}"
        try:
            output = tool.function(**arguments)
        except Exception as error:  # A failing tool is reported to the model, never fatal.
            return f"Error: {name} raised {type(error).__name__}: {error}"
        return tool_output_text(output)

    def to_json(self) -> str:
        """The conversation as JSON (tools and the model are supplied again on resume)."""
        return json.dumps(
            {"format": "k2jax.agent/1", "messages": self.messages}, ensure_ascii=False
        )

    @classmethod
    def from_json(cls, text: str, model: StreamingModel, tools=None, **kwargs: Any) -> Agent:
        """An agent resuming the conversation saved by `to_json`; kwargs as for `Agent`."""
        state = json.loads(text)
        if state.get("format") != "k2jax.agent/1":
            raise ValueError(
                f"not a saved k2jax agent conversation: format {state.get('format')!r}"
            )
        return cls(model, tools, messages=state["messages"], **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Writes `to_json()` to `path` (via a temporary file, so a crash leaves the old one)."""
        temporary = f"{os.fspath(path)}.tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(self.to_json())
        os.replace(temporary, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: StreamingModel, tools=None, **kwargs: Any
    ) -> Agent:
        """An agent resuming the conversation saved at `path`; kwargs as for `Agent`."""
        with open(path, encoding="utf-8") as file:
            return cls.from_json(file.read(), model, tools, **kwargs)
