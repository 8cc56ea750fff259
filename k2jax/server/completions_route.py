"""`POST /v1/completions`: a text or token-id prompt continued as plain text."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from k2jax.server.errors import APIError
from k2jax.server.prompts import sampling_params
from k2jax.server.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
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
from k2jax.server.streaming import TextDecoder, token_text
from k2jax.serving.persistent_engine import EngineRequest


async def completion(server: Server, body: CompletionRequest, request: Request):
    arrived = time.monotonic()
    check_common(server, body)
    try:
        prompt = body.single_prompt()
    except ValueError as error:
        raise APIError(400, str(error), param="prompt") from None
    tokenizer = server.tokenizer
    if isinstance(prompt, str):
        if tokenizer is None:
            raise APIError(
                400, "this model has no tokenizer: send the prompt as token ids", param="prompt"
            )
        prompt_ids = tokenizer.encode(prompt)
    else:
        prompt_ids = list(prompt)
        bad = [t for t in prompt_ids if not 0 <= t < server.vocab_size]
        if bad:
            raise APIError(
                400,
                f"prompt token id {bad[0]} is outside the vocabulary [0, {server.vocab_size})",
                param="prompt",
            )
    max_new_tokens = token_budget(server, len(prompt_ids), body)
    top = body.logprobs or 0
    sampling = sampling_params(body, logprobs=body.logprobs is not None)
    handle = submit(
        server, EngineRequest(tuple(prompt_ids), max_new_tokens, sampling, top_logprobs=top)
    )
    progress = Progress(arrived)
    decoder = TextDecoder(tokenizer, body.stop_strings()) if tokenizer is not None else None
    reply_id = f"cmpl-{uuid.uuid4().hex}"
    state = {"offset": 0}

    def piece_of(token) -> tuple[str, CompletionLogprobs | None]:
        text = decoder.push(token.token) if decoder else ""
        if decoder and (token.finished or decoder.stopped):
            text += decoder.finish()
        logprobs = None
        if body.logprobs is not None:
            shown = token_text(tokenizer, token.token)[0] if tokenizer else str(token.token)
            alternatives = {
                (token_text(tokenizer, t)[0] if tokenizer else str(t)): lp
                for t, lp in token.top_logprobs
            }
            logprobs = CompletionLogprobs(
                tokens=[shown],
                token_logprobs=[token.logprob],
                top_logprobs=[alternatives] if top else None,
                text_offset=[state["offset"]],
            )
        state["offset"] += len(text)
        return text, logprobs

    if body.stream:

        async def chunks():
            created = int(time.time())

            def on_token(token):
                text, logprobs = piece_of(token)
                choice = CompletionChoice(
                    text=text,
                    logprobs=logprobs,
                    token_ids=[token.token] if body.return_token_ids else None,
                )
                pieces = [
                    sse(
                        Completion(
                            id=reply_id, created=created, model=server.model_name, choices=[choice]
                        )
                    )
                ]
                return pieces, bool(decoder and decoder.stopped)

            async for pieces in relay(server, handle, progress, "completions", on_token):
                for piece in pieces:
                    yield piece
            if progress.finish_reason is None:
                raise APIError(503, "the engine stopped before the request finished")
            last = CompletionChoice(text="", finish_reason=progress.finish_reason)
            yield sse(
                Completion(id=reply_id, created=created, model=server.model_name, choices=[last])
            )
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse(
                    Completion(
                        id=reply_id,
                        created=created,
                        model=server.model_name,
                        choices=[],
                        usage=usage(handle, progress),
                    )
                )

        return event_stream(chunks(), server, handle, progress, "completions")

    async def collect():
        texts: list[str] = []
        logprob_parts: list[CompletionLogprobs] = []

        def on_token(token):
            text, logprobs = piece_of(token)
            texts.append(text)
            if logprobs is not None:
                logprob_parts.append(logprobs)
            return None, bool(decoder and decoder.stopped)

        async for _ in relay(server, handle, progress, "completions", on_token):
            pass
        if progress.finish_reason is None:
            raise APIError(503, "the engine stopped before the request finished")
        logprobs = None
        if body.logprobs is not None:
            logprobs = CompletionLogprobs(
                tokens=[t for p in logprob_parts for t in p.tokens],
                token_logprobs=[lp for p in logprob_parts for lp in p.token_logprobs],
                top_logprobs=[a for p in logprob_parts for a in p.top_logprobs] if top else None,
                text_offset=[o for p in logprob_parts for o in p.text_offset],
            )
        choice = CompletionChoice(
            text="".join(texts),
            logprobs=logprobs,
            finish_reason=progress.finish_reason,
            token_ids=progress.token_ids if body.return_token_ids else None,
        )
        reply = Completion(
            id=reply_id,
            created=int(time.time()),
            model=server.model_name,
            choices=[choice],
            usage=usage(handle, progress),
            prompt_token_ids=prompt_ids if body.return_token_ids else None,
        )
        return JSONResponse(reply.model_dump(exclude_none=True))

    return await unless_disconnected(request, collect())
