"""What both endpoints share: the server's state, request checks, submission, the relay of a
request's tokens from the engine, disconnect handling and server-sent events."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from k2jax.chat.tokenizer import Tokenizer
from k2jax.server.bridge import HandleEvents
from k2jax.server.errors import APIError
from k2jax.server.metrics import Metrics
from k2jax.server.protocol import (
    ChatCompletionRequest,
    ErrorBody,
    ErrorResponse,
    PromptTokensDetails,
    Usage,
)
from k2jax.serving.persistent_engine import EngineRequest, QueueFull

_log = logging.getLogger("k2jax.server")
_DISCONNECT_POLL_SECONDS = 0.5


@dataclasses.dataclass
class Server:
    """One app's state: the engine, the tokenizer (None: token ids only), names, metrics."""

    engine: object  # PersistentEngine
    tokenizer: Tokenizer | None
    model_name: str
    metrics: Metrics
    created: int

    @property
    def context(self) -> int:
        return self.engine.model.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size


@dataclasses.dataclass
class Progress:
    """What a running request has produced so far."""

    arrived: float
    token_ids: list[int] = dataclasses.field(default_factory=list)
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    relayed: bool = False  # the relay started (its `finally` then ends the request)


def check_common(server: Server, body) -> None:
    """404 for another model's name; 400 for a field set to what this server does not do."""
    if body.model != server.model_name:
        raise APIError(
            404,
            f"model {body.model!r} does not exist; this server serves {server.model_name!r}",
            param="model",
            code="model_not_found",
        )
    unsupported = body.unsupported()
    if unsupported is not None:
        raise APIError(400, unsupported[1], param=unsupported[0])


def token_budget(server: Server, prompt_length: int, body) -> int:
    """The request's max new tokens; a prompt or a limit past the context is a 400 naming both
    numbers. No limit: as many as fit the context and, for this request alone, the pool."""
    context, limit = server.context, body.token_limit()
    if prompt_length >= context:
        raise APIError(
            400,
            f"the prompt is {prompt_length} tokens, but the model's context is {context} tokens "
            "(it must leave room for at least one new token)",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    if limit is None:
        # As many as fit: in the context, and in the page pool for this request alone (the
        # last new token needs no cache slot).
        engine = server.engine
        pool_tokens = engine.stats().num_pages * engine.config.page_size + 1
        fits = min(context, pool_tokens) - prompt_length
        if fits < 1:
            raise APIError(
                400,
                f"the prompt is {prompt_length} tokens, but the server's KV page pool holds "
                f"{pool_tokens - 1} tokens for one request",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        return fits
    if prompt_length + limit > context:
        field = "max_tokens"
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens:
            field = "max_completion_tokens"
        raise APIError(
            400,
            f"the prompt ({prompt_length} tokens) plus {field} ({limit}) is "
            f"{prompt_length + limit} tokens, more than the model's context ({context} tokens)",
            param=field,
            code="context_length_exceeded",
        )
    return limit


def submit(server: Server, engine_request: EngineRequest):
    try:
        server.engine.validate(engine_request)
    except ValueError as error:
        server.metrics.rejected.labels("400").inc()
        raise APIError(400, str(error)) from None
    try:
        handle = server.engine.submit(engine_request)
    except QueueFull as error:
        server.metrics.rejected.labels("429").inc()
        raise APIError(
            429, f"the server's queue is full, retry later ({error})", code="queue_full"
        ) from None
    server.metrics.prompt_tokens.inc(len(engine_request.prompt))
    return handle


def usage(handle, progress: Progress) -> Usage:
    completion = len(progress.token_ids)
    return Usage(
        prompt_tokens=handle.prompt_tokens,
        completion_tokens=completion,
        total_tokens=handle.prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=handle.cached_tokens),
    )


async def relay(
    server: Server, handle, progress: Progress, endpoint: str, on_token: Callable
) -> AsyncIterator[object]:
    """Calls `on_token(step_token) -> (result, stop)` per token and yields each result that is
    not None, until the request finishes or `stop` is true (a stop string matched); whatever
    way it ends, a request still running is cancelled."""
    progress.relayed = True
    events = HandleEvents(handle)
    try:
        async for token in events:
            progress.token_ids.append(token.token)
            progress.token_times.append(time.monotonic())
            if token.finished:
                progress.finish_reason = token.finish_reason
            result, stop = on_token(token)
            if result is not None:
                yield result
            if stop:
                progress.finish_reason = "stop"
                break
            if token.finished:
                break
    finally:
        if not handle.done:
            server.metrics.cancelled.inc()
        events.close()
        server.metrics.generation_tokens.inc(len(progress.token_ids))
        server.metrics.observe_request(progress.arrived, progress.token_times)
        server.metrics.requests.labels(endpoint, progress.finish_reason or "cancelled").inc()


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_SECONDS)


async def unless_disconnected(request: Request, work):
    """Awaits `work`, cancelling it (and so its request) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return Response(status_code=499)
    return task.result()


def sse(model) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def _end_unrelayed(server: Server, handle, progress: Progress, endpoint: str) -> None:
    """After a streamed response: a request whose relay never started (the client went away
    before the stream's first byte, so Starlette never iterated it) is cancelled here. A
    coroutine, so Starlette runs it on the event loop, not on a pooled worker thread."""
    if progress.relayed or handle.done:
        return
    handle.cancel()
    server.metrics.cancelled.inc()
    server.metrics.requests.labels(endpoint, "cancelled").inc()


def event_stream(
    chunks: AsyncIterator[str], server: Server, handle, progress: Progress, endpoint: str
) -> StreamingResponse:
    """The SSE response of ``chunks``; whatever way the response ends (including a client
    gone before its first byte), the request does not outlive it."""

    async def body():
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as error:  # the status line is sent: the error goes in the stream
            if isinstance(error, APIError):
                message = error.message
            else:
                _log.exception("a streamed request failed")
                message = f"internal error: {type(error).__name__}: {error}"
            body = ErrorResponse(error=ErrorBody(message=message, type="server_error"))
            yield f"data: {body.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
        # Starlette runs the background task after the response, also when it was cut short
        # by a disconnect before the body started.
        background=BackgroundTask(_end_unrelayed, server, handle, progress, endpoint),
    )
