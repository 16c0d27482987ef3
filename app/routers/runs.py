"""Runs and their layers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app import runs
from app.deps import Conn, Id, Reader, Writer
from app.openapi import error_responses
from app.schemas import LayerCreate, LayerList, LayerOut, RunCreate, RunList, RunOut, RunUpdate

router = APIRouter(prefix="/v1/runs", tags=["runs"])


def run_out(run: runs.Run) -> RunOut:
    return RunOut.model_validate(run, from_attributes=True)


def layer_out(layer: runs.Layer) -> LayerOut:
    return LayerOut.model_validate(layer, from_attributes=True)


@router.post("", status_code=201, response_model=RunOut, responses=error_responses(409))
def create_run(body: RunCreate, principal: Writer, conn: Conn) -> RunOut:
    return run_out(runs.create_run(conn, principal.project_id, body.name, body.config))


@router.get("", response_model=RunList)
def list_runs(
    principal: Reader,
    conn: Conn,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> RunList:
    return RunList(runs=[run_out(run) for run in runs.list_runs(conn, principal.project_id, limit, offset)])


@router.get("/{run_id}", response_model=RunOut)
def get_run(run_id: Id, principal: Reader, conn: Conn) -> RunOut:
    return run_out(runs.get_run(conn, principal.project_id, run_id))


@router.patch("/{run_id}", response_model=RunOut)
def update_run(body: RunUpdate, run_id: Id, principal: Writer, conn: Conn) -> RunOut:
    return run_out(runs.update_run(conn, principal.project_id, run_id, body.status, body.metrics))


@router.delete("/{run_id}", status_code=204)
def delete_run(run_id: Id, principal: Writer, conn: Conn) -> Response:
    runs.delete_run(conn, principal.project_id, run_id)
    return Response(status_code=204)


@router.post("/{run_id}/layers", status_code=201, response_model=LayerOut, responses=error_responses(409))
def create_layer(body: LayerCreate, run_id: Id, principal: Writer, conn: Conn) -> LayerOut:
    return layer_out(runs.create_layer(conn, principal.project_id, run_id, body.name, body.dim, body.kind, body.sketch))


@router.get("/{run_id}/layers", response_model=LayerList)
def list_layers(run_id: Id, principal: Reader, conn: Conn) -> LayerList:
    return LayerList(layers=[layer_out(layer) for layer in runs.list_layers(conn, principal.project_id, run_id)])


@router.get("/{run_id}/layers/{layer_id}", response_model=LayerOut)
def get_layer(run_id: Id, layer_id: Id, principal: Reader, conn: Conn) -> LayerOut:
    return layer_out(runs.get_layer(conn, principal.project_id, run_id, layer_id))
