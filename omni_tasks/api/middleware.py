"""Checks every request passes before any route runs: the bearer token, the body limit.

Plain ASGI middleware (no per-request task or body copy): the token check is a header
lookup, and the body limit counts bytes as they arrive, so a client that sends no
`Content-Length` (chunked) is cut off at the limit too.
"""

from __future__ import annotations

import hmac
import json
import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omni_tasks.api.errors import error_body
from omni_tasks.api.page import is_page_path

log = logging.getLogger(__name__)

#: Paths answered without the token: a load balancer's health check.
OPEN_PATHS = frozenset({"/healthz"})


async def send_error(send: Send, status: int, message: str, code: str, **headers: str) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class CatchAll:
    """A 500 in OpenAI's shape for what no handler answered: the error is logged here,
    and the client gets its type only, never a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except HTTPException as exc:  # raised outside a route (a body read past the limit)
            if not started and scope["type"] == "http":
                code = getattr(exc, "code", None) or "http_error"
                await send_error(send, exc.status_code, str(exc.detail), code)
        except Exception as exc:
            log.exception("unexpected error answering %s", scope.get("path"))
            if not started and scope["type"] == "http":
                await send_error(send, 500, f"internal error ({type(exc).__name__})", "internal")


class BearerAuth:
    """401 unless `Authorization: Bearer <token>` (when a token is set)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if self.expected is None or scope["type"] != "http" or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "GET" and is_page_path(path):  # the page: no data
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = "missing or wrong bearer token (Authorization: Bearer <OMNI_API_TOKEN>)"
        await send_error(send, 401, message, "invalid_api_key", **{"WWW-Authenticate": "Bearer"})


class BodyLimit:
    """413 for a body over `limit` bytes: by its `Content-Length` before reading it, or
    once the bytes read pass the limit (outside CatchAll, which answers what escapes)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # the app's handler (or CatchAll) answers 413
                    raise BodyTooLarge(self.message())
            return message

        await self.app(scope, counted, send)

    def message(self) -> str:
        return f"the request body is over the limit of {self.limit / 2**20:g} MiB (api.max_body_mb)"

    async def _refuse(self, send: Send) -> None:
        await send_error(send, 413, self.message(), BodyTooLarge.code)


class BodyTooLarge(HTTPException):
    """Raised while a route reads a body past the limit (an HTTPException, so that the
    body parsers let it through to the app's handler)."""

    code = "body_too_large"

    def __init__(self, message: str) -> None:
        super().__init__(413, message)
