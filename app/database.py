"""Connections to PostgreSQL: the pool the service uses, and the settings every connection gets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

from app.settings import Settings


def one_row(cursor: psycopg.Cursor[Any]) -> Any:
    """The row a statement always returns: an aggregate, an upsert's RETURNING, a row just locked.

    None there means the schema or the statement is wrong, not the request: an internal error.
    """
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("a statement that always returns a row returned none")
    return row


def connection_kwargs(settings: Settings) -> dict:
    """Every query runs under a statement timeout, so a slow scan can't hold a worker forever.

    Connections are in autocommit mode: a domain function that writes more than one
    statement opens `conn.transaction()`, which then is a real BEGIN/COMMIT, so a
    route's answer is sent only after its writes are durable.
    """
    return {
        "options": f"-c statement_timeout={int(settings.statement_timeout_ms)}",
        "autocommit": True,
        "connect_timeout": settings.connect_timeout_s,
    }


def connect(url: str, settings: Settings, **kwargs) -> psycopg.Connection:
    conn = psycopg.connect(url, **{**connection_kwargs(settings), **kwargs})
    _configure(conn)
    return conn


def _configure(conn: psycopg.Connection) -> None:
    register_vector(conn)


def open_pool(url: str, settings: Settings, on_connect_failed: Callable[[], None] = lambda: None) -> ConnectionPool:
    """The service's pool. It gives up on a failed connection attempt at once (after one retry) instead of
    backing off for minutes: `DatabaseHealth` probes the database and heals the pool when it returns,
    and the pool grows again on demand."""
    pool = ConnectionPool(
        url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        kwargs=connection_kwargs(settings),
        configure=_configure,
        timeout=settings.request_timeout_s,
        reconnect_timeout=0.0,
        reconnect_failed=lambda pool: on_connect_failed(),
        open=False,
    )
    pool.open(wait=True, timeout=30)
    return pool


def lock_name(conn: psycopg.Connection, kind: str, project_id: int, name: str) -> None:
    """Serialises creations of one name in a project until commit.

    On Citus a unique key must include the distribution column, so (project, name) of a
    run or a bank is no constraint there: this lock and a look before the insert keep it
    unique (on one server the constraint stays, as a second guard).
    """
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, %s))", (f"{kind}:{name}", project_id))
