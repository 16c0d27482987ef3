"""Whether the database answers: requests fail fast while it does not, and the pool is healed when it does.

Without this a request waits on the pool up to its deadline while PostgreSQL is down,
and after it returns the pool's own reconnection backs off (1, 2, 4 ... s) before
anything is served again. Here one probe thread decides: a request that meets a
broken connection (or a pool that cannot connect) only asks for a probe; the probe
marks the database down when a `SELECT 1` fails or stays unanswered for
`probe_timeout_s`, and up again at the first answer, after `pool.check()` has thrown
away the connections the outage broke.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from app.deadline import HeldConnections
from app.settings import Settings
from eidetic.errors import Unavailable

__all__ = ["DatabaseHealth"]

log = logging.getLogger(__name__)


class DatabaseHealth:
    """The database's state as the service sees it, kept by a probe thread."""

    def __init__(self, url: str, settings: Settings) -> None:
        self._url = url
        self._connect_timeout = settings.connect_timeout_s
        self._interval = settings.probe_interval_s
        self._heartbeat = settings.heartbeat_s
        self._probe_timeout = settings.probe_timeout_s
        self._down_since: float | None = None  # monotonic time, None while up
        self._reason = ""
        self._pool: ConnectionPool | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ping: Future[bool] | None = None
        self._probe_conn: psycopg.Connection | None = None

    @property
    def up(self) -> bool:
        return self._down_since is None

    def start(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._thread = threading.Thread(target=self._run, name="database-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self._probe_timeout + 1)
        if self._probe_conn is not None:
            with suppress(Exception):
                self._probe_conn.close()

    def suspect(self) -> None:
        """Something failed the way an outage would: probe now rather than at the next heartbeat."""
        self._wake.set()

    def raise_if_down(self) -> None:
        down_since = self._down_since
        if down_since is not None:
            raise Unavailable(
                f"the database has not answered for {time.monotonic() - down_since:.1f} s ({self._reason}); "
                "retry later (a write with the same batch id)"
            )

    @contextmanager
    def connection(self, pool: ConnectionPool, timeout: float, held: HeldConnections) -> Iterator[psycopg.Connection]:
        """A pooled connection, refused at once while the database is down; in `held` while lent.

        The pool is waited on in slices of one probe interval, so a request that was
        already waiting when the database went down is answered within one more slice.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.raise_if_down()
            remaining = deadline - time.monotonic()
            try:
                conn = pool.getconn(timeout=max(0.001, min(self._interval, remaining)))
                break
            except PoolTimeout:
                if time.monotonic() >= deadline:
                    self.suspect()
                    raise
        held.add(conn)
        try:
            with conn:  # as the pool's own connection(): commit, or roll back on an error
                yield conn
        except psycopg.OperationalError:
            if conn.broken:
                self.suspect()
            raise
        finally:
            held.remove(conn)
            if held.cancelled:
                conn.close()  # the pool replaces it
            pool.putconn(conn)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._heartbeat if self.up else self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._step()
            except Exception:  # the probe thread must outlive anything a probe meets
                log.exception("database probe failed")

    def _step(self) -> None:
        answered, reason = self._probe()
        if answered and not self.up:
            self._recover()
        elif not answered and self.up:
            self._down_since = time.monotonic()
            self._reason = reason
            log.warning("database down: %s", reason)

    def _probe(self) -> tuple[bool, str]:
        """One verdict within probe_timeout_s; a ping still hanging (a frozen server) is waited on, not repeated."""
        if self._ping is None or self._ping.done():
            self._ping = Future()
            # a daemon thread: one stuck on a frozen server must not hold up the process's exit
            threading.Thread(target=self._select_one, args=(self._ping,), name="database-ping", daemon=True).start()
        try:
            return self._ping.result(timeout=self._probe_timeout), "no connection"
        except FutureTimeout:
            return False, f"no answer within {self._probe_timeout:g} s"

    def _select_one(self, answer: Future[bool]) -> None:
        answer.set_result(self._answers())

    def _answers(self) -> bool:
        for fresh in (False, True):
            try:
                if fresh or self._probe_conn is None or self._probe_conn.closed:
                    if self._probe_conn is not None:
                        with suppress(Exception):
                            self._probe_conn.close()
                    self._probe_conn = None
                    self._probe_conn = psycopg.connect(
                        self._url, autocommit=True, connect_timeout=self._connect_timeout
                    )
                self._probe_conn.execute("SELECT 1")
                return True
            except Exception:  # refused, reset, timed out: all mean no answer
                continue
        return False

    def _recover(self) -> None:
        """Broken connections out of the pool before anyone is let in again."""
        assert self._down_since is not None
        if self._pool is not None:
            with suppress(Exception):
                self._pool.check()
        log.warning("database back after %.2f s", time.monotonic() - self._down_since)
        self._down_since = None
        self._reason = ""
