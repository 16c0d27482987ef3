"""FastAPI dependencies: the connection pool, the caller, and the request body under its size limit.

Routes name their needs with the aliases (`conn: Conn`, `principal: Writer`, `run_id: Id`),
so a signature reads like what the route uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import psycopg
from fastapi import Depends, Path, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from app import keys
from app.deadline import held_connections
from app.keys import Principal, Scope
from eidetic.errors import InvalidInput, PayloadTooLarge, Unauthenticated


@contextmanager
def request_connection(request: Request) -> Iterator[psycopg.Connection]:
    """A pooled connection (autocommit), refused at once with 503 while the database is down,
    and held where the request's deadline can cancel its statement."""
    health = request.app.state.database_health
    timeout = request.app.state.settings.request_timeout_s
    with health.connection(request.app.state.pool, timeout, held_connections(request)) as conn:
        yield conn


def get_conn(request: Request) -> Iterator[psycopg.Connection]:
    """The route's connection, committed when the route returns without error."""
    with request_connection(request) as conn:
        yield conn


def authenticate_request(request: Request) -> Principal:
    """The caller, from its bearer key (or the open principal when auth is off on loopback).

    Called by the service's authentication middleware before the route parses anything,
    so a request without a valid key hears 401 whatever its body holds.
    """
    if request.app.state.settings.no_auth:
        return request.app.state.open_principal
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("send 'Authorization: Bearer KEY'", field="Authorization")
    with request_connection(request) as conn:
        return keys.authenticate(conn, key.strip())


def get_principal(request: Request) -> Principal:
    """The caller the middleware authenticated (routes outside /v1 authenticate here)."""
    principal = getattr(request.state, "principal", None)
    return principal if principal is not None else authenticate_request(request)


Conn = Annotated[psycopg.Connection, Depends(get_conn)]
Caller = Annotated[Principal, Depends(get_principal)]


def reader(principal: Caller) -> Principal:
    principal.require(Scope.read)
    return principal


def writer(principal: Caller) -> Principal:
    principal.require(Scope.write)
    return principal


Reader = Annotated[Principal, Depends(reader)]  # a caller whose key may read
Writer = Annotated[Principal, Depends(writer)]  # a caller whose key may write
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]  # a positive 64-bit id in the path


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


_KNOWN_QUERY = "eidetic_known_query"  # kept on the route object itself, worked out on first use


def refuse_unknown_query(request: Request) -> None:
    """A misspelt parameter (`?tsk=A`) is an error, never an unfiltered read or a default."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = getattr(route, _KNOWN_QUERY, None)
    if known is None:
        known = frozenset(_query_names(route.dependant))
        setattr(route, _KNOWN_QUERY, known)
    for name in request.query_params:
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise InvalidInput(f"unknown query parameter {name!r}; this route takes: {listed}", field=name)


def _query_names(dependant: Dependant) -> Iterator[str]:
    """The query parameters a route and all its dependencies declare."""
    yield from (field.alias for field in dependant.query_params)
    for dependency in dependant.dependencies:
        yield from _query_names(dependency)
