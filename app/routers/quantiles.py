"""Quantile sets of a layer's stored activations, and bucketing of new activations against them."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, Request

from app import quantiles, runs
from app.deps import Conn, Id, Reader, Writer
from app.query import ActivationFilter
from app.schemas import (
    BucketizeOut,
    BucketizeRequest,
    QuantileSetInfoOut,
    QuantileSetList,
    QuantileSetOut,
    QuantilesRequest,
)
from app.settings import Settings
from eidetic.errors import InvalidInput
from eidetic.wire.vectors import as_float32, require_finite

router = APIRouter(tags=["quantiles"])


def quantile_set_out(found: quantiles.QuantileSet) -> QuantileSetOut:
    return QuantileSetOut(
        id=found.id,
        run_id=found.run_id,
        layer_id=found.layer_id,
        version=found.version,
        method=found.method,
        n_quantiles=found.n_quantiles,
        rows=found.rows,
        filter=found.filter,
        boundaries=found.boundaries.tolist(),
        rank_error=found.rank_error,
        created_at=found.created_at,
        pending_rows=found.pending_rows,
        lag_s=found.lag_s,
    )


@router.post("/v1/runs/{run_id}/layers/{layer_id}/quantiles", status_code=201, response_model=QuantileSetOut)
def compute_quantiles(
    body: QuantilesRequest, request: Request, run_id: Id, layer_id: Id, principal: Writer, conn: Conn
) -> QuantileSetOut:
    """Computes Q-1 boundaries per unit over the selected rows and stores them as a new version.

    A sketch answer states the rows it covers and how far behind the sketches were
    (`pending_rows`, `lag_s`); `wait_for` asks for one that covers every batch committed
    before the request.
    """
    settings: Settings = request.app.state.settings
    if body.wait_for is not None and body.method != "sketch":
        raise InvalidInput("wait_for applies to method=sketch (exact quantiles read the rows)", field="wait_for")
    if body.wait_for is not None and body.wait_for >= settings.request_timeout_s:
        raise InvalidInput(
            f"wait_for is under the request timeout ({settings.request_timeout_s:g} s)", field="wait_for"
        )
    layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
    where = ActivationFilter(
        task=body.task, label=body.label, epoch=body.epoch, step_min=body.step_min, step_max=body.step_max
    ).check()
    sketch = quantiles.SketchOptions(settings.sketch_k, settings.sketch_fold_values, body.wait_for)
    found = quantiles.compute(
        conn,
        layer,
        body.n_quantiles,
        body.method,
        where,
        settings.max_quantile_memory_bytes,
        settings.scan_timeout_ms,
        sketch,
    )
    return quantile_set_out(found)


@router.get("/v1/runs/{run_id}/layers/{layer_id}/quantiles", response_model=QuantileSetList)
def list_quantile_sets(
    run_id: Id,
    layer_id: Id,
    principal: Reader,
    conn: Conn,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many sets, newest first.")] = 100,
) -> QuantileSetList:
    """The layer's quantile sets (version, method, Q, filter, rows), newest first, without their boundaries."""
    layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
    return QuantileSetList(
        sets=[QuantileSetInfoOut(**asdict(info)) for info in quantiles.list_sets(conn, layer, limit)]
    )


@router.get("/v1/runs/{run_id}/layers/{layer_id}/quantiles/latest", response_model=QuantileSetOut)
def latest_quantiles(
    run_id: Id,
    layer_id: Id,
    principal: Reader,
    conn: Conn,
    method: Annotated[str | None, Query(pattern="^(exact|sketch)$")] = None,
) -> QuantileSetOut:
    layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
    return quantile_set_out(quantiles.latest(conn, layer, method))


@router.get("/v1/quantile-sets/{set_id}", response_model=QuantileSetOut)
def get_quantile_set(set_id: Id, principal: Reader, conn: Conn) -> QuantileSetOut:
    return quantile_set_out(quantiles.get(conn, principal.project_id, set_id))


@router.post("/v1/quantile-sets/{set_id}/bucketize", response_model=BucketizeOut)
def bucketize(body: BucketizeRequest, request: Request, set_id: Id, principal: Reader, conn: Conn) -> BucketizeOut:
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
    return BucketizeOut(buckets=quantiles.bucketize(found.boundaries, values).tolist())
