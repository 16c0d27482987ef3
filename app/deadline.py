"""Every request's deadline, its streamed body included, and what a 503 tells the caller.

A frozen database outlasts statement_timeout on the client side (the cancel request
itself hangs), so each request has its own deadline. Shortly before it, the statements
the request is running are cancelled, so that a write answered 503 does not commit
afterwards; the request is then given the rest of its time to finish. If it does
(rolled back by the cancel, or committed just before it), that answer is sent. If it
does not (a database too frozen to take the cancel), the answer is 503 and the write's
outcome is unknown: the caller retries it with the same batch id, which the ledger
makes safe. Once the status line is sent the answer can't change: a passed deadline,
like a StreamAborted, then ends the request without the body's end, and the server
drops the connection.

Pure ASGI on purpose: BaseHTTPMiddleware ends a streamed body cleanly when the app fails
midway, which would turn a failed stream into a short one that looks complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import TypeVar

import psycopg
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.streams import StreamAborted
from eidetic.errors import DeadlineExceeded

__all__ = [
    "HeldConnections",
    "RequestDeadline",
    "RetryAfter",
    "held_connections",
    "request_deadline",
    "within_deadline",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
_HELD = "database_connections"


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
                with contextlib.suppress(psycopg.Error):
                    conn.cancel_safe(timeout=timeout)


def held_connections(request: Request) -> HeldConnections:
    """This request's connections (the middleware and the route share one ASGI scope's state)."""
    state = request.scope.setdefault("state", {})
    if _HELD not in state:
        state[_HELD] = HeldConnections()
    return state[_HELD]


class RequestDeadline:
    """ASGI middleware: every request has `seconds` from its arrival, its streamed body included.

    At `seconds - grace` the statements the request runs are cancelled; an error answer
    that cancel causes (a 503 from the cancelled statement) is replaced by 503
    `deadline_exceeded`, any other answer that still arrives in time is the true one.
    """

    def __init__(self, app: ASGIApp, seconds: float, cancel_grace_s: float) -> None:
        self.app = app
        self.seconds = seconds
        self.grace = min(cancel_grace_s, seconds / 4)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + self.seconds
        state = scope.setdefault("state", {})
        state["deadline"] = time.monotonic() + self.seconds
        held = state.setdefault(_HELD, HeldConnections())
        started = replaced = abandoned = False

        async def send_watched(message: Message) -> None:
            nonlocal started, replaced
            if abandoned:
                return  # answered already; a route's thread finishing late sends into the void
            if message["type"] == "http.response.start":
                if held.cancelled and message["status"] == 503:
                    replaced = True  # the cancelled statement's error: answered as deadline_exceeded below
                    return
                started = True
            elif replaced:
                return
            await send(message)

        answer = asyncio.ensure_future(self.app(scope, receive, send_watched))
        done, _ = await asyncio.wait({answer}, timeout=self.seconds - self.grace)
        if not done and held:
            cancel = asyncio.to_thread(held.cancel_statements, self.grace / 2)
            with contextlib.suppress(TimeoutError):  # a frozen server: the cancel goes on in its thread
                await asyncio.wait_for(cancel, timeout=self.grace / 2)
        if not done:
            done, _ = await asyncio.wait({answer}, timeout=max(0.0, ends_at - loop.time()))
        where = f"{scope['method']} {scope['path']}"
        if done:
            try:
                answer.result()
            except StreamAborted:
                if not started:
                    raise
                return  # logged where it failed; returning without the body's end drops the connection
            except (TimeoutError, DeadlineExceeded):
                if started:
                    log.warning("deadline of %.1f s passed while streaming %s: connection dropped", self.seconds, where)
                    return
                replaced = True
            if not replaced:
                return
        else:
            # Not awaited: a route blocked in a worker thread (a frozen database) cannot be
            # interrupted, and waiting for it would hold the caller past the deadline.
            abandoned = True
            answer.cancel()
            answer.add_done_callback(_retrieve_quietly)
            health = getattr(scope["app"].state, "database_health", None)
            if health is not None:
                health.suspect()
            if started:
                log.warning("deadline of %.1f s passed while streaming %s: connection dropped", self.seconds, where)
                return
        log.warning("deadline of %.1f s passed on %s", self.seconds, where)
        error = DeadlineExceeded(
            f"no answer within {self.seconds:g} s; the outcome is unknown: retry later (a write with the same batch id)"
        )
        await JSONResponse(error.to_json(), status_code=error.status_code)(scope, receive, send)


def _retrieve_quietly(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("a request abandoned at its deadline ended with %r", task.exception())


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


def request_deadline(request: Request) -> float:
    """When the request's time is up, on the time.monotonic() clock."""
    return request.state.deadline


def within_deadline(
    conn: psycopg.Connection, steps: Iterator[T], deadline: float, statement_timeout_ms: int
) -> Iterator[T]:
    """The steps of a stream's database work, stopped at the deadline, each statement timed out by it.

    Call inside a transaction: the shorter statement_timeout is local to it.
    """
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise DeadlineExceeded("the request's deadline passed while streaming")
        timeout_ms = min(statement_timeout_ms, left_ms) if statement_timeout_ms > 0 else left_ms  # 0: no limit
        conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(timeout_ms),))
        try:
            step = next(steps)
        except StopIteration:
            return
        yield step
