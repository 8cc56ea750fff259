"""K2 Thinking's chat layer: the chat format, parsing of generated turns, and the agent loop."""

from k2jax.chat.agent import Agent, AgentResult, make_tool, schema_from_signature
from k2jax.chat.parse import ParseEvent, StreamParser, parse
from k2jax.chat.render import IncrementalRenderer, render, render_text, render_with_template

__all__ = [
    "Agent",
    "AgentResult",
    "IncrementalRenderer",
    "ParseEvent",
    "StreamParser",
    "make_tool",
    "parse",
    "render",
    "render_text",
    "render_with_template",
    "schema_from_signature",
]
