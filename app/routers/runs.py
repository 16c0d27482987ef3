"""Runs and their layers."""

from __future__ import annotations

from dataclasses import asdict

import psycopg
from fastapi import APIRouter, Depends, Query, Response

from app import runs
from app.deps import get_conn, id_path, reader, writer
from app.keys import Principal
from app.openapi import error_responses
from app.schemas import LayerCreate, LayerList, LayerOut, RunCreate, RunList, RunOut, RunUpdate

router = APIRouter(prefix="/v1/runs", tags=["runs"])


@router.post("", status_code=201, response_model=RunOut, responses=error_responses(409))
def create_run(
    body: RunCreate, principal: Principal = Depends(writer), conn: psycopg.Connection = Depends(get_conn)
) -> RunOut:
    return RunOut(**asdict(runs.create_run(conn, principal.project_id, body.name, body.config)))


@router.get("", response_model=RunList)
def list_runs(
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=2**31),
    principal: Principal = Depends(reader),
    conn: psycopg.Connection = Depends(get_conn),
) -> RunList:
    found = runs.list_runs(conn, principal.project_id, limit, offset)
    return RunList(runs=[RunOut(**asdict(run)) for run in found])


@router.get("/{run_id}", response_model=RunOut)
def get_run(
    run_id: int = id_path(), principal: Principal = Depends(reader), conn: psycopg.Connection = Depends(get_conn)
) -> RunOut:
    return RunOut(**asdict(runs.get_run(conn, principal.project_id, run_id)))


@router.patch("/{run_id}", response_model=RunOut)
def update_run(
    body: RunUpdate,
    run_id: int = id_path(),
    principal: Principal = Depends(writer),
    conn: psycopg.Connection = Depends(get_conn),
) -> RunOut:
    return RunOut(**asdict(runs.update_run(conn, principal.project_id, run_id, body.status, body.metrics)))


@router.delete("/{run_id}", status_code=204)
def delete_run(
    run_id: int = id_path(), principal: Principal = Depends(writer), conn: psycopg.Connection = Depends(get_conn)
) -> Response:
    runs.delete_run(conn, principal.project_id, run_id)
    return Response(status_code=204)


@router.post("/{run_id}/layers", status_code=201, response_model=LayerOut, responses=error_responses(409))
def create_layer(
    body: LayerCreate,
    run_id: int = id_path(),
    principal: Principal = Depends(writer),
    conn: psycopg.Connection = Depends(get_conn),
) -> LayerOut:
    layer = runs.create_layer(conn, principal.project_id, run_id, body.name, body.dim, body.kind, body.sketch)
    return LayerOut(**asdict(layer))


@router.get("/{run_id}/layers", response_model=LayerList)
def list_layers(
    run_id: int = id_path(), principal: Principal = Depends(reader), conn: psycopg.Connection = Depends(get_conn)
) -> LayerList:
    return LayerList(
        layers=[LayerOut(**asdict(layer)) for layer in runs.list_layers(conn, principal.project_id, run_id)]
    )


@router.get("/{run_id}/layers/{layer_id}", response_model=LayerOut)
def get_layer(
    run_id: int = id_path(),
    layer_id: int = id_path(),
    principal: Principal = Depends(reader),
    conn: psycopg.Connection = Depends(get_conn),
) -> LayerOut:
    return LayerOut(**asdict(runs.get_layer(conn, principal.project_id, run_id, layer_id)))
