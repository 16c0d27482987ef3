"""Answers streamed after their status line: they end verifiably or not at all."""

from __future__ import annotations

import logging

import psycopg
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.errors import EideticError
from app.formats import ARROW_STREAM

log = logging.getLogger(__name__)


class StreamAborted(Exception):
    """A streamed answer failed after its 200 was sent: the connection is dropped, never ended cleanly."""


class ArrowStreamResponse(StreamingResponse):
    """An Arrow IPC stream (formats.ipc_stream) whose failure midway becomes StreamAborted.

    By the time the rows are read the status is sent, so the error can't become a JSON error;
    what the client must see instead is a body without its end (the deadline middleware
    turns StreamAborted into a dropped connection).
    """

    media_type = ARROW_STREAM

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            raise
        except (psycopg.Error, EideticError) as error:  # the database failed or the deadline passed: expected
            log.warning("stream of %s %s aborted after it started: %s", scope["method"], scope["path"], error)
            raise StreamAborted(str(error)) from error
        except Exception as error:
            log.exception("stream of %s %s failed after it started", scope["method"], scope["path"])
            raise StreamAborted(str(error)) from error
