"""Activations of a layer: ingest (Arrow, .npy, JSON), filtered keyset pages and streams, summaries."""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from psycopg_pool import ConnectionPool

from app import ingest, query, runs, sampling
from app.deadline import request_deadline, within_deadline
from app.deps import Conn, Id, Reader, Writer, read_body
from app.openapi import error_responses
from app.runs import Layer
from app.schemas import ActivationBatchIn, ActivationPage, ActivationRowOut, IngestOut, SummaryOut
from app.settings import Settings
from app.streams import ArrowStreamResponse
from eidetic.errors import InvalidInput
from eidetic.wire import formats

router = APIRouter(prefix="/v1/runs/{run_id}/layers/{layer_id}", tags=["activations"])

INT32 = 2**31 - 1
INT64 = 2**63 - 1

_INGEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "An Arrow IPC stream (bulk), a .npy float32 matrix, or JSON for small batches.",
        "content": {
            formats.JSON: {"schema": {"$ref": f"#/components/schemas/{ActivationBatchIn.__name__}"}},
            formats.ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}},
            formats.NPY: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/activations",
    status_code=201,
    response_model=IngestOut,
    openapi_extra=_INGEST_BODY,
    responses={
        200: {"model": IngestOut, "description": "A retried batch, already stored: nothing copied."},
        **error_responses(409, 415),
    },
)
async def ingest_activations(
    request: Request,
    response: Response,
    run_id: Id,
    layer_id: Id,
    principal: Writer,
    conn: Conn,
    batch_id: Annotated[
        str | None, Query(min_length=1, max_length=200, description="Idempotency key of the batch.")
    ] = None,
    sample_id_start: Annotated[
        int | None, Query(ge=0, le=INT64, description=".npy: sample ids start, one per row.")
    ] = None,
    step: Annotated[int | None, Query(ge=-INT64, le=INT64, description=".npy: the step of every row.")] = None,
    epoch: Annotated[int | None, Query(ge=-INT32, le=INT32, description=".npy: the epoch of every row.")] = None,
    label: Annotated[int | None, Query(ge=-INT32, le=INT32, description=".npy: the label of every row.")] = None,
    task: Annotated[str | None, Query(min_length=1, max_length=200, description=".npy: the task of every row.")] = None,
) -> IngestOut:
    settings: Settings = request.app.state.settings
    body = await read_body(request, settings.max_body_bytes)
    params = {"sample_id_start": sample_id_start, "step": step, "epoch": epoch, "label": label, "task": task}

    def store() -> ingest.IngestResult:
        layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
        rows, body_batch_id = formats.parse_rows(request.headers.get("content-type"), body, params)
        return ingest.store_batch(conn, layer, ingest.choose_batch_id(batch_id, body_batch_id), rows, settings)

    result = await run_in_threadpool(store)
    request.app.state.metrics.record_ingest(result.rows, result.duplicate)
    if result.duplicate:  # a retried batch, already stored
        response.status_code = 200
    return IngestOut(batch_id=result.batch_id, rows=result.rows, duplicate=result.duplicate)


def activation_filter(
    *,
    task: Annotated[str | None, Query(max_length=200)] = None,
    label: Annotated[int | None, Query(ge=-INT32, le=INT32)] = None,
    epoch: Annotated[int | None, Query(ge=-INT32, le=INT32)] = None,
    step_min: Annotated[int | None, Query(ge=-INT64, le=INT64)] = None,
    step_max: Annotated[int | None, Query(ge=-INT64, le=INT64)] = None,
    sample_id: Annotated[list[int], Query(default_factory=list, description="Repeat to ask for several sample ids.")],
) -> query.ActivationFilter:
    for value in sample_id:
        if not -INT64 <= value <= INT64:
            raise InvalidInput("sample ids are 64-bit integers", field="sample_id")
    return query.ActivationFilter(task, label, epoch, step_min, step_max, tuple(sample_id)).check()


Where = Annotated[query.ActivationFilter, Depends(activation_filter)]  # the rows a read selects


@router.get(
    "/activations",
    response_model=ActivationPage,
    responses={
        200: {
            "content": {formats.ARROW_STREAM: {}},
            "description": "JSON page, or an Arrow stream that ends with an empty record batch whose custom "
            "metadata 'eidetic.end' holds its row count; a stream that fails midway is cut off without it.",
        }
    },
)
def read_activations(
    request: Request,
    run_id: Id,
    layer_id: Id,
    where: Where,
    principal: Reader,
    conn: Conn,
    limit: Annotated[
        int | None, Query(ge=1, description="Rows per page; with format=arrow, omit it to stream all.")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
    format: Annotated[Literal["json", "arrow"], Query()] = "json",
) -> ActivationPage | ArrowStreamResponse:
    settings: Settings = request.app.state.settings
    layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
    after = query.RowKey.decode(cursor) if cursor else query.BEFORE_FIRST
    if limit is not None and limit > settings.max_page_limit:
        raise InvalidInput(f"limit is at most {settings.max_page_limit}", field="limit")
    if format == "arrow":
        rows = _arrow_stream(request.app.state.pool, layer, where, after, limit, settings, request_deadline(request))
        return ArrowStreamResponse(rows)
    page, next_cursor = query.page(conn, layer, where, after, limit or settings.default_page_limit)
    return ActivationPage(rows=[_row_out(row) for row in page], next_cursor=next_cursor)


def _row_out(row: tuple) -> ActivationRowOut:
    record = dict(zip(query.ROW_FIELDS, row))
    record["values"] = [formats.json_safe(v) for v in record["values"].tolist()]
    return ActivationRowOut(**record)


def _arrow_stream(
    pool: ConnectionPool,
    layer: Layer,
    where: query.ActivationFilter,
    after: query.RowKey,
    limit: int | None,
    settings: Settings,
    deadline: float,
) -> Generator[bytes, None, None]:
    """Record batches as they are read, inside one snapshot, by the deadline; memory stays at one window."""
    schema = pa.schema(
        [pa.field("batch_id", pa.string()), pa.field("row", pa.int32()), *formats.arrow_schema(layer.dim)]
    )
    with pool.connection(timeout=max(deadline - time.monotonic(), 0.001)) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        windows = query.iter_row_windows(conn, layer, where, after, limit, window_rows=settings.stream_window_rows)
        windows = within_deadline(conn, windows, deadline, settings.statement_timeout_ms)
        yield from formats.ipc_stream(schema, (_window_batch(window, schema, layer.dim) for window in windows))


def _window_batch(window: list[tuple], schema: pa.Schema, dim: int) -> pa.RecordBatch:
    columns = dict(zip(query.ROW_FIELDS, zip(*window)))
    values = np.stack(columns["values"]).astype(np.float32, copy=False).reshape(-1)
    arrays = {
        "batch_id": pa.array(columns["batch_id"], type=pa.string()),
        "row": pa.array(columns["row"], type=pa.int32()),
        "sample_id": pa.array(columns["sample_id"], type=pa.int64()),
        "step": pa.array(columns["step"], type=pa.int64()),
        "epoch": pa.array(columns["epoch"], type=pa.int32()),
        "task": pa.array(columns["task"], type=pa.string()),
        "label": pa.array(columns["label"], type=pa.int32()),
        "values": pa.FixedSizeListArray.from_arrays(pa.array(values), dim),
    }
    return pa.record_batch([arrays[name] for name in schema.names], schema=schema)


@router.get("/summary", response_model=SummaryOut, response_model_exclude_unset=True)
def summary(
    run_id: Id,
    layer_id: Id,
    where: Where,
    principal: Reader,
    conn: Conn,
    request: Request,
    sample: Annotated[
        bool,
        Query(
            description="Read a block sample of about `summary_sample_rows` rows (a setting) when the layer "
            "holds more (the answer says so); the default reads every selected row."
        ),
    ] = False,
) -> SummaryOut:
    """Per-unit count, mean, std, min and max of the selected rows."""
    layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
    settings: Settings = request.app.state.settings
    chosen = None
    if sample:
        stats, chosen = sampling.answer(
            sampling.choose(conn, layer, settings.summary_sample_rows),
            lambda read: query.summarize(conn, layer, where, read),
            lambda found: found.rows,
        )
    else:
        stats = query.summarize(conn, layer, where)

    def finite(name: str) -> list[float | None]:
        return [formats.json_safe(v) for v in getattr(stats, name).tolist()]

    read = {} if chosen is None else chosen.fields()  # unset, so left out of an unsampled answer
    return SummaryOut(
        rows=stats.rows, mean=finite("mean"), std=finite("std"), min=finite("min"), max=finite("max"), **read
    )
