"""Authentication before anything else: a request to /v1 without a valid key hears 401 first.

FastAPI parses a route's body before its dependencies run, so a malformed body without a
key would otherwise answer 400/422 and tell an anonymous caller how its input was read.

Pure ASGI on purpose (like app.deadline): BaseHTTPMiddleware ends a streamed body cleanly
when the app fails midway, which would make a failed Arrow stream look complete.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from app.deps import authenticate_request

AUTHENTICATED_PREFIX = "/v1/"


class Authenticate:
    """Puts the caller's Principal into the request state, or answers the error of why it can't."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(AUTHENTICATED_PREFIX):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            principal = await run_in_threadpool(authenticate_request, request)
        except Exception as error:  # answered by the handler registered for it, as if a route raised it
            response = await _handled(request, error)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _handled(request: Request, error: Exception):
    for kind in type(error).__mro__:
        handler = request.app.exception_handlers.get(kind)
        if handler is not None:
            return await handler(request, error)
    raise error
