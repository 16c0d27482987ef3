"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app import migrate
from app.schemas import HealthOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, response_model_exclude_none=True)
def healthz() -> HealthOut:
    """The process is up (says nothing of the database)."""
    return HealthOut(status="ok")


@router.get("/readyz", response_model=HealthOut, response_model_exclude_none=True)
def readyz(request: Request, response: Response) -> HealthOut:
    """Ready when the database answers and its schema is at the head revision (else 503, with this same body)."""
    health = getattr(request.app.state, "database_health", None)
    if health is not None and not health.up:  # known down: say so at once, as every route does
        response.status_code = 503
        return HealthOut(status="unavailable", reason="database down")
    try:
        with request.app.state.pool.connection(timeout=5) as conn:
            revision = migrate.current_revision(conn)
    except Exception as error:  # any failure to reach the database means not ready
        response.status_code = 503
        return HealthOut(status="unavailable", reason=type(error).__name__)
    head = migrate.head_revision()
    if revision != head:
        response.status_code = 503
        return HealthOut(status="unavailable", reason=f"schema at {revision}, head is {head}")
    return HealthOut(status="ok", revision=revision)
