"""The FastAPI application: wiring of settings, the pool, routers and the one error shape."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import psycopg
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app import __version__, keys
from app.authentication import Authenticate
from app.banks import BackgroundMerger, GrowingCache
from app.database import open_pool
from app.database_health import DatabaseHealth
from app.deadline import RequestDeadline, RetryAfter
from app.deps import refuse_unknown_query
from app.metrics import install_metrics
from app.openapi import install_openapi
from app.routers import activations, aggregates, dashboard, health, islands, memory, plasticity, quantiles, runs
from app.settings import Settings
from app.sketches import Sketcher
from eidetic.errors import EideticError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "malformed_body",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
}


def error_response(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status)


def create_app(settings: Settings, database_url: str) -> FastAPI:
    """The service over one database; the pool opens at startup and closes at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        database_health = DatabaseHealth(database_url, settings)
        app.state.pool = open_pool(database_url, settings, on_connect_failed=database_health.suspect)
        database_health.start(app.state.pool)
        app.state.database_health = database_health
        merger = BackgroundMerger(database_url, settings)
        merger.start()
        if settings.no_auth:
            with app.state.pool.connection() as conn:
                app.state.open_principal = keys.open_principal(conn)
        sketcher = Sketcher(app.state.pool, settings) if settings.sketcher else None
        if sketcher is not None:
            sketcher.start()
        try:
            yield
        finally:
            if sketcher is not None:
                sketcher.stop()
            merger.stop()
            database_health.stop()
            app.state.pool.close()

    app = FastAPI(
        title="Eidetic",
        version=__version__,
        description="A Postgres-backed activation store and indexing service for PyTorch training.",
        lifespan=lifespan,
        dependencies=[Depends(refuse_unknown_query)],
    )
    app.state.settings = settings
    app.state.database_url = database_url  # a merge runs on a connection of its own
    app.state.growing_cache = GrowingCache(settings.growing_cache_mb * 2**20, settings.exact_scan_values)
    # Added first, runs innermost: who the caller is, settled before any route reads its body
    # and inside the deadline (a key look-up that waits on the database is cancelled like any other).
    app.add_middleware(Authenticate)
    app.add_middleware(RequestDeadline, seconds=settings.request_timeout_s, cancel_grace_s=settings.cancel_grace_s)
    app.add_middleware(RetryAfter, seconds=settings.retry_after_s)
    install_metrics(app).watch_growing_cache(app.state.growing_cache)
    for router in (health, runs, activations, quantiles, memory, plasticity, islands, aggregates, dashboard):
        app.include_router(router.router)
    _install_error_handlers(app)
    install_openapi(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EideticError)
    async def eidetic_error(request: Request, error: EideticError) -> JSONResponse:
        return JSONResponse(error.to_json(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        location = [str(part) for part in first.get("loc", ())]
        field = ".".join(location[1:]) if len(location) > 1 else (location[0] if location else None)
        return error_response(422, "invalid_input", f"{field}: {first.get('msg')}", field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail))

    @app.exception_handler(PoolTimeout)
    async def pool_timeout(request: Request, error: PoolTimeout) -> JSONResponse:
        return error_response(503, "unavailable", "no database connection came free in time; retry later")

    @app.exception_handler(psycopg.errors.QueryCanceled)
    async def query_canceled(request: Request, error: psycopg.errors.QueryCanceled) -> JSONResponse:
        return error_response(503, "timeout", "the query ran past the statement timeout; narrow it or retry")

    @app.exception_handler(psycopg.errors.DataError)
    async def data_error(request: Request, error: psycopg.errors.DataError) -> JSONResponse:
        # class 22: the database refused a value the request carried (a NUL in text, a number out of range)
        detail = (error.diag.message_primary or "a value the database cannot store").strip()
        return error_response(422, "invalid_input", f"the database refused a value: {detail}")

    @app.exception_handler(psycopg.OperationalError)
    async def database_down(request: Request, error: psycopg.OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", error)
        return error_response(503, "unavailable", "the database is unavailable; retry later")

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, error: ClientDisconnect) -> Response:
        # Expected whenever a client gives up mid-upload; nothing was stored and nobody listens.
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "an unexpected error; it has been logged")
