"""Error bodies and exception handlers: every error leaves as OpenAI's
`{"error": {"message", "type", "param", "code"}}`, whatever raised it.

Client mistakes are 400 (the openai client does not retry them), not FastAPI's 422; routing misses
keep their 404/405; only genuine bugs are 500, and those fail one request, never the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.errors import RequestError
from ..engine.events import NotReady, QueueFull

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 503: "server_error"}
_CODES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large",
          415: "unsupported_media_type"}


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields; raise it anywhere in the HTTP layer."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else _CODES.get(status)
        self.headers = headers

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def engine_error(exc: BaseException, retry_after_s: int = 1) -> APIError:
    """The one mapping of what the engine and its scheduler raise to HTTP: the client's request 400,
    a full queue 429, a model not ready (loading, failed, stopping) 503, anything else 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, exc.message, param=exc.param)
    if isinstance(exc, QueueFull):
        return APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                        code="queue_full", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, NotReady):
        return APIError(503, str(exc), code="unavailable", headers={"Retry-After": str(retry_after_s)})
    # An engine bug: the request fails, the server and other requests carry on. The scheduler has
    # logged it with its traceback; the client learns nothing of the server's insides.
    return APIError(500, "internal error while generating", code="internal_error")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def param_path(loc: Sequence[str | int]) -> str:
    """Pydantic location -> the field path OpenAI puts in `param`: ("messages", 0, "content") ->
    "messages[0].content"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation_error(
    exc: ValidationError, clean: Callable[[tuple], tuple] = lambda loc: loc,
) -> APIError:
    """The first problem pydantic found, as a 400 naming its field (`clean` maps pydantic's
    location to the request's field path)."""
    first = exc.errors(include_url=False)[0]
    loc = clean(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('msg')}")
    param = param_path(loc) or None
    where = f" at '{param}'" if param else ""
    return bad_request(f"invalid request{where}: {first.get('msg')}", param)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = "not found: no such route"
    err = APIError(exc.status_code, message, headers=getattr(exc, "headers", None))
    return err.response()


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    loc = [p for p in (errors[0].get("loc", ()) if errors else ()) if p not in ("body", "query", "path")]
    param = param_path(loc) or None
    message = errors[0].get("msg", "invalid request") if errors else "invalid request"
    return bad_request(f"invalid request: {message}", param).response()


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # A bug, not a client error: log it with its traceback; the client gets the error shape anyway.
    logger.error("unhandled error while serving a request", exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"), 500)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the OpenAI error shape."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
