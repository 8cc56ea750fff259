"""The OpenAI-compatible HTTP API over one `PersistentEngine` (FastAPI; uvicorn serves it).

    POST /v1/chat/completions   K2 chat: reasoning_content, content and tool_calls apart
    POST /v1/completions        plain text or token-id prompts
    GET  /v1/models, /health, /metrics

Each request is validated, rendered and submitted to the engine, whose own thread runs the
batch; the route then relays the request's tokens as they come (`bridge.HandleEvents`), through
the decoders of `streaming`, as one JSON reply or as server-sent events. A request ends when
the engine finishes it, when a stop string matches, or when its client goes away; the last two
cancel it in the engine, which frees its pages at the next step.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import Response

from k2jax.chat.tokenizer import Tokenizer
from k2jax.server import errors
from k2jax.server.chat_route import chat_completion
from k2jax.server.completions_route import completion
from k2jax.server.metrics import CONTENT_TYPE, Metrics
from k2jax.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from k2jax.server.relay import Server

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


def create_app(
    engine,
    tokenizer: Tokenizer | None,
    *,
    model_name: str,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The API over a started `PersistentEngine`; `tokenizer` None allows token ids only."""
    app = FastAPI(title="k2jax", summary="Kimi K2 Thinking in JAX, OpenAI-compatible")
    server = Server(engine, tokenizer, model_name, Metrics(engine.stats), int(time.time()))
    app.state.server = server
    errors.install(app)
    app.add_middleware(errors.BodySizeLimit, max_bytes=max_body_bytes)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        card = ModelCard(id=server.model_name, created=server.created, max_model_len=server.context)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat_completion(server, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await completion(server, body, request)

    return app
