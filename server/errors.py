"""The one place that maps exceptions to HTTP status codes and the error body.

Every error leaves the server as
``{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.decode import PromptTooLongError
from server.observability import REQUEST_ID_HEADER
from server.policy import UnknownConstraintError
from server.store import InvalidCursorError, StoreUnavailableError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status, for the mapper to render."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code, self.message, self.type = status_code, message, type
        self.param, self.code, self.headers = param, code, headers


class QueueFullError(ApiError):
    def __init__(self, max_queue: int, retry_after_s: int):
        super().__init__(429, f"the generation queue is full ({max_queue} requests waiting); retry in "
                         f"{retry_after_s} s", type="rate_limit_error", code="queue_full",
                         headers={"Retry-After": str(retry_after_s)})


# OpenAI's API returns 400 for an invalid request where this project's own routes use 422;
# OpenAI clients map the status to their exception classes, so these routes follow OpenAI.
OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def error_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_response(error: ApiError, request: Request | None = None) -> JSONResponse:
    status_code = error.status_code
    if status_code == 422 and request is not None and request.url.path in OPENAI_PATHS:
        status_code = 400
    return JSONResponse(error_body(error), status_code=status_code, headers=error.headers)


def _location(loc: tuple) -> str:
    """Turn a pydantic error location into a dotted field path without the 'body' prefix."""
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _describe(error: dict) -> str:
    if error.get("type") == "json_invalid":
        reason = error.get("ctx", {}).get("error", "JSON decode error")
        return f"the request body is not valid JSON ({reason} at character {error['loc'][-1]}); send a JSON object"
    message = f"{_location(error['loc'])}: {error['msg'].removeprefix('Value error, ')}"
    received = error.get("input")
    if error.get("type") != "missing" and isinstance(received, (bool, int, float, str)):
        message += f" (received {str(received)[:80]!r})" if isinstance(received, str) else f" (received {received})"
    return message


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ()}
    param = "body" if first.get("type") == "json_invalid" else _location(first["loc"])
    message = "invalid request: " + "; ".join(_describe(error) for error in errors)
    return error_response(ApiError(422, message, param=param, code="invalid_value"), request)


def map_exception(exc: Exception, request_id: str | None) -> ApiError:
    """Turn any exception into the ApiError to send; unexpected ones are logged with the request id."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, UnknownConstraintError):
        return ApiError(422, str(exc), param="policy", code="invalid_value")
    if isinstance(exc, InvalidCursorError):
        return ApiError(422, str(exc), param="cursor", code="invalid_value")
    if isinstance(exc, StoreUnavailableError):
        logger.error("Audit store unavailable for request %s: %s", request_id, exc, extra={"request_id": request_id})
        return ApiError(503, "the audit store is unavailable, so the output was not returned; retry later",
                        type="service_unavailable", code="audit_store_unavailable", headers={"Retry-After": "5"})
    if isinstance(exc, StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind)
    logger.exception("Unhandled error in request %s", request_id, extra={"request_id": request_id})
    return ApiError(500, "internal server error; the request id identifies it in the server log",
                    type="server_error", code="internal_error")


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    response = error_response(map_exception(exc, request_id), request)
    # The response to an unhandled error is sent outside the request id middleware, so the header is set here too.
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    for exc_type in (ApiError, PromptTooLongError, UnknownConstraintError, InvalidCursorError, StoreUnavailableError,
                     StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, _handle)
