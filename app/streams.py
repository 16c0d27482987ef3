"""Answers streamed after their status line: they end verifiably or not at all."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import AsyncIterator, Generator

import anyio
import psycopg
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from eidetic.errors import EideticError
from eidetic.wire.formats import ARROW_STREAM

log = logging.getLogger(__name__)


class StreamAborted(Exception):
    """A streamed answer failed after its 200 was sent: the connection is dropped, never ended cleanly."""


class ArrowStreamResponse(StreamingResponse):
    """An Arrow IPC stream (formats.ipc_stream) read from a generator that holds a database transaction.

    By the time the rows are read the status is sent, so a failure can't become a JSON error;
    it becomes StreamAborted, which the deadline middleware turns into a dropped connection.
    However the answer ends, the generator is closed with it, so its pooled connection and
    snapshot are let go at once rather than whenever it is garbage-collected.
    """

    media_type = ARROW_STREAM

    def __init__(self, chunks: Generator[bytes, None, None]) -> None:
        self._chunks = chunks
        self._reading = threading.Lock()  # one step of the generator at a time, closing included
        super().__init__(self._read_in_threads())

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
        finally:
            if inspect.getgeneratorstate(self._chunks) != inspect.GEN_CLOSED:
                # Cancelled (deadline, disconnect) or failed: a read may still run on its worker thread,
                # which no cancellation stops; close the generator once it returns, without waiting here.
                threading.Thread(target=self._close, name="eidetic-stream-close", daemon=True).start()

    async def _read_in_threads(self) -> AsyncIterator[bytes]:
        while (chunk := await anyio.to_thread.run_sync(self._read)) is not None:
            yield chunk

    def _read(self) -> bytes | None:
        with self._reading:
            return next(self._chunks, None)

    def _close(self) -> None:
        with self._reading:
            self._chunks.close()
