"""Request body size limit, enforced before any route reads or parses the body."""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError, error_response

logger = logging.getLogger(__name__)


def body_too_large(max_body_bytes: int, received: str) -> ApiError:
    return ApiError(413, f"the request body is {received}, above this server's limit of {max_body_bytes} bytes "
                    "(TRACEHEAD_MAX_BODY_BYTES); send a shorter prompt or fewer messages",
                    param="body", code="body_too_large")


class BodySizeLimitMiddleware:
    """Reject a request body over ``max_body_bytes`` with 413.

    A declared Content-Length is checked before anything is read. A chunked body
    is read here in full, counting bytes, and replayed to the app only if it fits,
    so no route reads a partial body. Routes read the whole body anyway before
    parsing JSON, so buffering here costs no extra memory.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(scope, receive, send, f"{int(declared)} bytes (Content-Length)")
            return

        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client disconnected, and the app receives that message from replay()
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                await self._reject(scope, receive, send, f"more than {self.max_body_bytes} bytes (chunked)")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, received: str) -> None:
        logger.warning("Rejected a request body of %s to %s (limit %d bytes)", received, scope.get("path"),
                       self.max_body_bytes)
        await error_response(body_too_large(self.max_body_bytes, received))(scope, receive, send)
