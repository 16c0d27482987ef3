"""Quantile sets of a layer's stored activations, and bucketing of new activations against them."""

from __future__ import annotations

import psycopg
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from app import quantiles, runs
from app.deps import get_conn, id_path, reader, writer
from app.keys import Principal
from app.query import ActivationFilter
from app.schemas import BucketizeOut, BucketizeRequest, QuantileSetOut, QuantilesRequest
from app.settings import Settings
from eidetic.errors import InvalidInput
from eidetic.wire.vectors import as_float32, require_finite

router = APIRouter(tags=["quantiles"])


def quantile_set_json(found: quantiles.QuantileSet) -> dict:
    return {
        "id": found.id,
        "run_id": found.run_id,
        "layer_id": found.layer_id,
        "version": found.version,
        "method": found.method,
        "n_quantiles": found.n_quantiles,
        "rows": found.rows,
        "filter": found.filter,
        "boundaries": found.boundaries.tolist(),
        "rank_error": found.rank_error,
        "created_at": found.created_at.isoformat(),
    }


@router.post("/v1/runs/{run_id}/layers/{layer_id}/quantiles", status_code=201, response_model=QuantileSetOut)
def compute_quantiles(
    body: QuantilesRequest,
    request: Request,
    run_id: int = id_path(),
    layer_id: int = id_path(),
    principal: Principal = Depends(writer),
    conn: psycopg.Connection = Depends(get_conn),
) -> JSONResponse:
    """Computes Q-1 boundaries per unit over the selected rows and stores them as a new version."""
    settings: Settings = request.app.state.settings
    layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
    where = ActivationFilter(
        task=body.task, label=body.label, epoch=body.epoch, step_min=body.step_min, step_max=body.step_max
    ).check()
    found = quantiles.compute(
        conn, layer, body.n_quantiles, body.method, where, settings.max_quantile_memory_bytes, settings.scan_timeout_ms
    )
    return JSONResponse(quantile_set_json(found), status_code=201)


@router.get("/v1/runs/{run_id}/layers/{layer_id}/quantiles/latest", response_model=QuantileSetOut)
def latest_quantiles(
    run_id: int = id_path(),
    layer_id: int = id_path(),
    method: str | None = Query(None, pattern="^(exact|sketch)$"),
    principal: Principal = Depends(reader),
    conn: psycopg.Connection = Depends(get_conn),
) -> JSONResponse:
    layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
    return JSONResponse(quantile_set_json(quantiles.latest(conn, layer, method)))


@router.get("/v1/quantile-sets/{set_id}", response_model=QuantileSetOut)
def get_quantile_set(
    set_id: int = id_path(), principal: Principal = Depends(reader), conn: psycopg.Connection = Depends(get_conn)
) -> JSONResponse:
    return JSONResponse(quantile_set_json(quantiles.get(conn, principal.project_id, set_id)))


@router.post("/v1/quantile-sets/{set_id}/bucketize", response_model=BucketizeOut)
def bucketize(
    body: BucketizeRequest,
    request: Request,
    set_id: int = id_path(),
    principal: Principal = Depends(reader),
    conn: psycopg.Connection = Depends(get_conn),
) -> JSONResponse:
    """Bucket indices (0..Q-1) of each unit of each row: the number of boundaries strictly below."""
    settings: Settings = request.app.state.settings
    if len(body.values) > settings.max_bucketize_rows:
        raise InvalidInput(f"at most {settings.max_bucketize_rows} rows per request", field="values")
    found = quantiles.get(conn, principal.project_id, set_id)
    units = found.boundaries.shape[0]
    for i, row in enumerate(body.values):
        if len(row) != units:
            raise InvalidInput(f"row {i} has {len(row)} values; the set has {units} units", field=f"values[{i}]")
    values = as_float32(body.values)
    require_finite(values, "values[{}]")
    return JSONResponse({"buckets": quantiles.bucketize(found.boundaries, values).tolist()})
