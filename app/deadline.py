"""Request deadlines: the whole answer, a streamed body included, within Settings.request_timeout_s."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TypeVar

import psycopg
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eidetic.errors import DeadlineExceeded
from app.streams import StreamAborted

log = logging.getLogger(__name__)

T = TypeVar("T")


class RequestDeadline:
    """ASGI middleware: every request has `seconds` from its arrival, its streamed body included.

    A frozen database can outlast statement_timeout on the client side (the cancel request
    itself hangs), so the caller gets a 503 instead of waiting. Once the status line is sent
    the answer can't change: a passed deadline, like a StreamAborted, then ends the request
    without the body's end, and the server drops the connection.

    Pure ASGI on purpose: BaseHTTPMiddleware ends a streamed body cleanly when the app fails
    midway, which would turn a failed stream into a short one that looks complete.
    """

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["deadline"] = time.monotonic() + self.seconds
        started = False

        async def send_watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        timeout = asyncio.timeout(self.seconds)
        try:
            async with timeout:
                await self.app(scope, receive, send_watched)
        except TimeoutError:
            if not timeout.expired():
                raise
            where = f"{scope['method']} {scope['path']}"
            if started:
                log.warning("deadline of %.1f s passed while streaming %s: connection dropped", self.seconds, where)
                return
            log.warning("deadline of %.1f s passed on %s", self.seconds, where)
            error = DeadlineExceeded(f"no answer within {self.seconds:g} s; retry later")
            await JSONResponse(error.to_json(), status_code=error.status_code)(scope, receive, send)
        except StreamAborted:
            if not started:
                raise
            # Logged where it failed. Returning without the body's end makes the server drop the connection.


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
