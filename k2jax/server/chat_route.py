"""`POST /v1/chat/completions`: render, submit, and relay the reply as reasoning, content and
tool calls (one JSON reply, or server-sent events)."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from k2jax.chat.tokenizer import Tokenizer
from k2jax.server.errors import APIError
from k2jax.server.prompts import chat_prompt, sampling_params
from k2jax.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    DeltaToolCall,
    ReplyFunction,
    ReplyMessage,
    ReplyToolCall,
    TokenLogprob,
    TopLogprob,
)
from k2jax.server.relay import (
    Progress,
    Server,
    check_common,
    event_stream,
    relay,
    sse,
    submit,
    token_budget,
    unless_disconnected,
    usage,
)
from k2jax.server.streaming import ChatTurnDecoder, Delta, token_text
from k2jax.serving.persistent_engine import EngineRequest


def _token_logprob(tokenizer: Tokenizer, token) -> TokenLogprob:
    text, raw = token_text(tokenizer, token.token)
    alternatives = []
    for token_id, logprob in token.top_logprobs:
        alt_text, alt_raw = token_text(tokenizer, token_id)
        alternatives.append(TopLogprob(token=alt_text, logprob=logprob, bytes=alt_raw))
    return TokenLogprob(token=text, logprob=token.logprob, bytes=raw, top_logprobs=alternatives)


def _finish_reason(progress: Progress, decoder: ChatTurnDecoder) -> str:
    if progress.finish_reason == "stop" and decoder.tool_calls:
        return "tool_calls"
    return progress.finish_reason or "stop"


async def chat_completion(server: Server, body: ChatCompletionRequest, request: Request):
    arrived = time.monotonic()
    check_common(server, body)
    tokenizer = server.tokenizer
    if tokenizer is None:
        raise APIError(
            400,
            "this model has no tokenizer, so it cannot chat; use /v1/completions with token ids",
            param="messages",
        )
    prompt = chat_prompt(body, tokenizer, server.engine.model.config.eos_token_id)
    max_new_tokens = token_budget(server, len(prompt.ids), body)
    sampling = sampling_params(body, logprobs=body.logprobs)
    engine_request = EngineRequest(
        tuple(prompt.ids),
        max_new_tokens,
        sampling,
        stop_token_ids=prompt.stop_token_ids,
        top_logprobs=body.top_logprobs or 0,
    )
    handle = submit(server, engine_request)
    progress = Progress(arrived)
    decoder = ChatTurnDecoder(
        tokenizer,
        first_tool_index=prompt.first_tool_index,
        stop_strings=body.stop_strings(),
        forced_prefix=prompt.forced,
    )
    reply_id = f"chatcmpl-{uuid.uuid4().hex}"

    def deltas_of(token) -> list[Delta]:
        deltas = decoder.push(token.token)
        if decoder.stop_string_matched or token.finished:
            deltas += decoder.finish()
        return deltas

    if body.stream:
        return event_stream(
            _chat_chunks(server, body, handle, progress, decoder, deltas_of, reply_id, prompt.ids),
            server,
            handle,
            progress,
            "chat",
        )

    async def collect():
        logprobs: list[TokenLogprob] = []

        def on_token(token):
            if body.logprobs:
                logprobs.append(_token_logprob(tokenizer, token))
            deltas_of(token)
            return None, decoder.stop_string_matched

        async for _ in relay(server, handle, progress, "chat", on_token):
            pass
        if progress.finish_reason is None:  # ended without a finished token: engine closed
            raise APIError(503, "the engine stopped before the request finished")
        decoder.finish()
        tool_calls = [
            ReplyToolCall(id=call["id"], function=ReplyFunction(**call["function"]))
            for call in decoder.tool_calls
        ]
        content = "".join(decoder.content)
        message = ReplyMessage(
            content=content if content or not tool_calls else None,
            reasoning_content="".join(decoder.reasoning) or None,
            tool_calls=tool_calls or None,
        )
        choice = ChatChoice(
            message=message,
            logprobs=ChoiceLogprobs(content=logprobs) if body.logprobs else None,
            finish_reason=_finish_reason(progress, decoder),
            token_ids=progress.token_ids if body.return_token_ids else None,
        )
        reply = ChatCompletion(
            id=reply_id,
            created=int(time.time()),
            model=server.model_name,
            choices=[choice],
            usage=usage(handle, progress),
            prompt_token_ids=prompt.ids if body.return_token_ids else None,
        )
        return JSONResponse(reply.model_dump(exclude_none=True))

    return await unless_disconnected(request, collect())


def _delta_model(delta: Delta) -> ChatDelta:
    if delta.kind == "reasoning":
        return ChatDelta(reasoning_content=delta.text)
    if delta.kind == "content":
        return ChatDelta(content=delta.text)
    call = delta.tool_call
    return ChatDelta(
        tool_calls=[
            DeltaToolCall(
                index=delta.tool_index, id=call["id"], function=ReplyFunction(**call["function"])
            )
        ]
    )


async def _chat_chunks(server, body, handle, progress, decoder, deltas_of, reply_id, prompt_ids):
    created = int(time.time())

    def chunk(delta: ChatDelta, **fields) -> str:
        choice = ChatChunkChoice(delta=delta, **fields)
        return sse(
            ChatCompletionChunk(
                id=reply_id, created=created, model=server.model_name, choices=[choice]
            )
        )

    first = ChatCompletionChunk(
        id=reply_id,
        created=created,
        model=server.model_name,
        choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))],
        prompt_token_ids=list(prompt_ids) if body.return_token_ids else None,
    )
    yield sse(first)
    tokenizer = server.tokenizer

    def on_token(token):
        deltas = deltas_of(token)
        extras = {}
        if body.logprobs:
            extras["logprobs"] = ChoiceLogprobs(content=[_token_logprob(tokenizer, token)])
        if body.return_token_ids:
            extras["token_ids"] = [token.token]
        pieces = [chunk(_delta_model(d)) for d in deltas[:-1]]
        if deltas:
            pieces.append(chunk(_delta_model(deltas[-1]), **extras))
        elif extras:
            pieces.append(chunk(ChatDelta(), **extras))
        return pieces, decoder.stop_string_matched

    async for pieces in relay(server, handle, progress, "chat", on_token):
        for piece in pieces:
            yield piece
    if progress.finish_reason is None:  # ended without a finished token: engine closed
        raise APIError(503, "the engine stopped before the request finished")
    for delta in decoder.finish():
        yield chunk(_delta_model(delta))
    yield chunk(ChatDelta(), finish_reason=_finish_reason(progress, decoder))
    if body.stream_options is not None and body.stream_options.include_usage:
        usage_chunk = ChatCompletionChunk(
            id=reply_id,
            created=created,
            model=server.model_name,
            choices=[],
            usage=usage(handle, progress),
        )
        yield sse(usage_chunk)
