"""Every request's deadline, and what a 503 tells the caller.

A frozen database outlasts statement_timeout on the client side (the cancel request
itself hangs), so each request has its own deadline. Shortly before it, the statement
the request is running is cancelled, so that a write answered 503 does not commit
afterwards; the request is then given the rest of its time to finish. If it does
(rolled back by the cancel, or committed just before it), that answer is sent. If it
does not (a database too frozen to take the cancel), the answer is 503 and the
write's outcome is unknown: the caller retries it with the same batch id, which the
ledger makes safe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import suppress

import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import EideticError

__all__ = ["DeadlineExceeded", "HeldConnections", "RetryAfter", "held_connections", "install_deadline"]

log = logging.getLogger(__name__)


class DeadlineExceeded(EideticError):
    status_code = 503
    code = "deadline_exceeded"


class HeldConnections:
    """The database connections one request holds right now, so its deadline can cancel their statements.

    A connection leaves the set under the same lock the cancel takes, so a cancel never
    reaches a connection already handed back to the pool (and to another request). Once
    a cancel was sent, the connections are closed rather than pooled again: a cancel
    delayed by a frozen server could otherwise strike the next request's statement.
    """

    def __init__(self) -> None:
        self._connections: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self.cancelled = False

    def __bool__(self) -> bool:
        return bool(self._connections)

    def add(self, conn: psycopg.Connection) -> None:
        with self._lock:
            self._connections.append(conn)

    def remove(self, conn: psycopg.Connection) -> None:
        with self._lock:
            self._connections.remove(conn)

    def cancel_statements(self, timeout: float) -> None:
        """Asks the server to cancel what each connection runs (blocking; `timeout` per connection)."""
        with self._lock:
            self.cancelled = True
            for conn in self._connections:
                with suppress(psycopg.Error):
                    conn.cancel_safe(timeout=timeout)


def held_connections(request: Request) -> HeldConnections:
    """This request's connections (the route's Request and the middleware's share one ASGI scope's state)."""
    state = request.state
    if not hasattr(state, "database_connections"):
        state.database_connections = HeldConnections()
    return state.database_connections


def install_deadline(app: FastAPI, seconds: float, cancel_grace_s: float) -> None:
    grace = min(cancel_grace_s, seconds / 4)

    @app.middleware("http")
    async def deadline(request: Request, call_next):
        held = held_connections(request)
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + seconds
        answer = asyncio.ensure_future(call_next(request))
        done, _ = await asyncio.wait({answer}, timeout=seconds - grace)
        if done:
            return answer.result()
        if held:
            cancel = asyncio.to_thread(held.cancel_statements, grace / 2)
            with suppress(TimeoutError):  # a frozen server: the cancel goes on in its thread
                await asyncio.wait_for(cancel, timeout=grace / 2)
        done, _ = await asyncio.wait({answer}, timeout=max(0.0, ends_at - loop.time()))
        log.warning("deadline of %.1f s passed on %s %s", seconds, request.method, request.url.path)
        if done:
            response = answer.result()
            if response.status_code != 503:
                return response  # it finished (a commit the cancel came too late for): the true answer
            async for _ in response.body_iterator:  # the cancelled statement's error, replaced below
                pass
        else:
            answer.cancel()
            health = getattr(request.app.state, "database_health", None)
            if health is not None:
                health.suspect()
        error = DeadlineExceeded(
            f"no answer within {seconds:g} s; the outcome is unknown: retry later (a write with the same batch id)"
        )
        return JSONResponse(error.to_json(), status_code=error.status_code)


class RetryAfter:
    """Puts `Retry-After` on every 503 that lacks one, whichever handler or middleware made it."""

    def __init__(self, app: ASGIApp, seconds: int) -> None:
        self.app = app
        self.value = str(seconds).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_retry_after(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"retry-after", self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_retry_after)
