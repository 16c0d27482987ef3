"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app import migrate

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up (says nothing of the database)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Ready when the database answers and its schema is at the head revision."""
    health = getattr(request.app.state, "database_health", None)
    if health is not None and not health.up:  # known down: say so at once, as every route does
        return JSONResponse({"status": "unavailable", "reason": "database down"}, status_code=503)
    try:
        with request.app.state.pool.connection(timeout=5) as conn:
            revision = migrate.current_revision(conn)
    except Exception as error:  # any failure to reach the database means not ready
        return JSONResponse({"status": "unavailable", "reason": type(error).__name__}, status_code=503)
    head = migrate.head_revision()
    if revision != head:
        return JSONResponse(
            {"status": "unavailable", "reason": f"schema at {revision}, head is {head}"}, status_code=503
        )
    return JSONResponse({"status": "ok", "revision": revision})
