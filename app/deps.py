"""FastAPI dependencies: the connection pool, the caller, and the request body under its size limit."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
from fastapi import Depends, Path, Request

from app import keys
from app.deadline import held_connections
from app.errors import PayloadTooLarge, Unauthenticated
from app.keys import Principal, Scope


def get_conn(request: Request) -> Iterator[psycopg.Connection]:
    """A pooled connection for one request (autocommit), refused at once with 503 while the database is down."""
    health = request.app.state.database_health
    timeout = request.app.state.settings.request_timeout_s
    with health.connection(request.app.state.pool, timeout, held_connections(request)) as conn:
        yield conn


def get_principal(request: Request, conn: psycopg.Connection = Depends(get_conn)) -> Principal:
    """The caller, from its bearer key (or the open principal when auth is off on loopback)."""
    if request.app.state.settings.no_auth:
        return request.app.state.open_principal
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("send 'Authorization: Bearer KEY'", field="Authorization")
    return keys.authenticate(conn, key.strip())


def reader(principal: Principal = Depends(get_principal)) -> Principal:
    principal.require(Scope.read)
    return principal


def writer(principal: Principal = Depends(get_principal)) -> Principal:
    principal.require(Scope.write)
    return principal


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it grows past the limit (a lying Content-Length included)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}", field="body")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes", field="body")
        chunks.append(chunk)
    return b"".join(chunks)


def id_path() -> Path:
    """A positive 64-bit id in the path (a fresh Path per parameter, as FastAPI binds each to its name)."""
    return Path(ge=1, le=2**63 - 1)
