"""OpenAI-style error replies: `{"error": {"message", "type", "param", "code"}}`.

Routes raise `APIError`; request-validation failures (pydantic) become 400s naming the field as
`messages[2].role`; oversized bodies become 413s (`BodySizeLimit`, an ASGI middleware that
counts the bytes as they arrive, so a huge body is refused without being buffered whole).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2jax.server.protocol import ErrorBody, ErrorResponse

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error reply: HTTP `status`, a message naming the problem, and the field (`param`)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_json(status: int, message: str, param: str | None = None, code: str | None = None):
    body = ErrorBody(
        message=message, type=_TYPES.get(status, "server_error"), param=param, code=code
    )
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=status)


def field_path(location: Sequence[str | int]) -> str:
    """("body", "messages", 2, "role") -> "messages[2].role"."""
    path = ""
    for part in location:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "body"


def _validation_message(error: dict) -> tuple[str, str]:
    location = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        why = (error.get("ctx") or {}).get("error") or error.get("msg")
        return "body", f"the body is not valid JSON: {why} (at character {location[-1]})"
    path = field_path(location)
    message = error.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if "input" in error and error.get("type") not in ("missing",):
        shown = json.dumps(error["input"], ensure_ascii=False, default=str)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = f"{message}, got {shown}"
    return path, f"{path}: {message}"


class _BodyTooLarge(HTTPException):
    # FastAPI's own HTTPException: raised while it reads the body, FastAPI passes it on (any
    # other exception there becomes a generic 400).
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the server's limit ({limit} bytes)")


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413, by Content-Length or as they stream."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                response = error_json(413, str(_BodyTooLarge(limit).detail), code="body_too_large")
                return await response(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        return await self.app(scope, counting_receive, send)


def install(app: FastAPI) -> None:
    """Registers the handlers that turn every failure into an OpenAI-style error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error_json(error.status, error.message, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        problems = [_validation_message(e) for e in error.errors()]
        param = problems[0][0] if problems else None
        message = "; ".join(text for _, text in problems[:3]) or "invalid request"
        return error_json(400, message, param)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        # A bug or an engine failure: still an OpenAI-shaped body, naming what happened.
        return error_json(500, f"internal error: {type(error).__name__}: {error}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        code = "body_too_large" if error.status_code == 413 else None
        return error_json(error.status_code, str(error.detail), code=code)
