"""The dashboard: HTML pages at / and /ui/..., and their scripts and styles (no data, so no key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from app import dashboard
from app.deps import Id
from eidetic.errors import NotFound

router = APIRouter(include_in_schema=False)


def page(name: str, **data: int) -> HTMLResponse:
    return HTMLResponse(dashboard.render(name, **data), headers={"Cache-Control": "no-cache"})


@router.get("/")
def runs_page() -> HTMLResponse:
    return page("runs")


@router.get("/ui/health")
def health_page() -> HTMLResponse:
    return page("health")


@router.get("/ui/runs/{run_id}/layers/{layer_id}")
def layer_page(run_id: Id, layer_id: Id) -> HTMLResponse:
    return page("layer", run_id=run_id, layer_id=layer_id)


@router.get("/ui/banks")
def banks_page() -> HTMLResponse:
    return page("banks")


@router.get("/ui/banks/{bank_id}")
def bank_page(bank_id: Id) -> HTMLResponse:
    return page("bank", bank_id=bank_id)


@router.get("/ui/static/{name:path}")
def static(name: str) -> FileResponse:
    path = dashboard.static_files().get(name)
    if path is None:
        raise NotFound(f"no dashboard file {name!r}", field="name")
    return FileResponse(path, media_type=dashboard.media_type(path), headers={"Cache-Control": "no-cache"})
