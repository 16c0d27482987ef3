"""Memory banks: create, write under the bank's policy, batched search, change feed and snapshot."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import psycopg
import pyarrow as pa
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from app import memory
from app.deadline import request_deadline, within_deadline
from app.deps import get_conn, id_path, reader, writer
from app.keys import Principal
from app.openapi import error_responses
from app.schemas import BankCreate, BankList, BankOut, ChangesOut, ItemsIn, SearchIn, SearchOut, WriteOut
from app.settings import Settings
from app.streams import ArrowStreamResponse
from eidetic.errors import InvalidInput
from eidetic.wire.formats import ARROW_STREAM, ipc_stream
from eidetic.wire.vectors import as_float32

router = APIRouter(prefix="/v1/memory-banks", tags=["memory banks"])


def bank_json(bank: memory.Bank) -> dict:
    described = asdict(bank)
    described.pop("project_id")
    described["created_at"] = bank.created_at.isoformat()
    return described


@router.post("", status_code=201, response_model=BankOut, responses=error_responses(409))
def create_bank(
    body: BankCreate, principal: Principal = Depends(writer), conn: psycopg.Connection = Depends(get_conn)
) -> JSONResponse:
    bank = memory.create_bank(
        conn,
        principal.project_id,
        body.name,
        body.dim,
        body.metric,
        body.capacity,
        body.policy,
        body.similarity_threshold,
        body.value_dim,
        body.hnsw_m,
        body.hnsw_ef_construction,
    )
    return JSONResponse(bank_json(bank), status_code=201)


@router.get("", response_model=BankList)
def list_banks(principal: Principal = Depends(reader), conn: psycopg.Connection = Depends(get_conn)) -> JSONResponse:
    return JSONResponse({"banks": [bank_json(bank) for bank in memory.list_banks(conn, principal.project_id)]})


@router.get("/{bank_id}", response_model=BankOut)
def get_bank(
    bank_id: int = id_path(), principal: Principal = Depends(reader), conn: psycopg.Connection = Depends(get_conn)
) -> JSONResponse:
    return JSONResponse(bank_json(memory.get_bank(conn, principal.project_id, bank_id)))


@router.delete("/{bank_id}", status_code=204)
def delete_bank(
    bank_id: int = id_path(), principal: Principal = Depends(writer), conn: psycopg.Connection = Depends(get_conn)
) -> Response:
    memory.delete_bank(conn, principal.project_id, bank_id)
    return Response(status_code=204)


@router.post("/{bank_id}/items", response_model=WriteOut)
def write_items(
    body: ItemsIn,
    request: Request,
    bank_id: int = id_path(),
    principal: Principal = Depends(writer),
    conn: psycopg.Connection = Depends(get_conn),
) -> JSONResponse:
    """Writes a batch atomically under the bank's replacement policy."""
    settings: Settings = request.app.state.settings
    if len(body.items) > settings.max_items_per_write:
        raise InvalidInput(f"at most {settings.max_items_per_write} items per write", field="items")
    width = len(body.items[0].key)
    for i, item in enumerate(body.items):
        if len(item.key) != width:
            raise InvalidInput(
                f"item {i} has a key of {len(item.key)} values, item 0 of {width}", field=f"items[{i}].key"
            )
    items = memory.NewItems(
        keys=as_float32([item.key for item in body.items]),
        labels=[item.label for item in body.items],
        values=[None if item.value is None else as_float32(item.value) for item in body.items],
        confidences=[item.confidence for item in body.items],
    )
    result = memory.write_items(conn, principal.project_id, bank_id, items, settings.scan_timeout_ms)
    return JSONResponse(asdict(result))


@router.delete("/{bank_id}/items/{item_id}")
def delete_item(
    bank_id: int = id_path(),
    item_id: int = id_path(),
    principal: Principal = Depends(writer),
    conn: psycopg.Connection = Depends(get_conn),
) -> JSONResponse:
    return JSONResponse({"version": memory.delete_item(conn, principal.project_id, bank_id, item_id)})


@router.post("/{bank_id}/search", response_model=SearchOut)
def search(
    body: SearchIn,
    request: Request,
    bank_id: int = id_path(),
    principal: Principal = Depends(reader),
    conn: psycopg.Connection = Depends(get_conn),
) -> JSONResponse:
    """k nearest items of each query, with a similarity-weighted prediction and its confidence."""
    settings: Settings = request.app.state.settings
    if body.k > settings.max_search_k:
        raise InvalidInput(f"k is at most {settings.max_search_k}", field="k")
    if len(body.queries) > settings.max_search_queries:
        raise InvalidInput(f"at most {settings.max_search_queries} queries per request", field="queries")
    bank = memory.get_bank(conn, principal.project_id, bank_id)
    for i, query in enumerate(body.queries):
        if len(query) != bank.dim:
            raise InvalidInput(
                f"query {i} has {len(query)} values; the bank's keys have {bank.dim}", field=f"queries[{i}]"
            )
    queries = as_float32(body.queries)
    answers = memory.search(conn, bank, queries, body.k, exact=body.exact, ef_search=body.ef_search, labels=body.labels)
    memory.record_hits(conn, bank, answers)
    fields = ("ids", "scores", "labels", "prediction", "confidence")
    return JSONResponse({"results": [{name: getattr(answer, name) for name in fields} for answer in answers]})


@router.get("/{bank_id}/changes", response_model=ChangesOut)
def changes(
    bank_id: int = id_path(),
    since: int = Query(0, ge=0, le=2**63 - 1),
    limit: int = Query(1000, ge=1, le=10_000),
    principal: Principal = Depends(reader),
    conn: psycopg.Connection = Depends(get_conn),
) -> JSONResponse:
    """What changed after version `since`: items (written or replaced) and tombstones, in version order."""
    found = memory.changes(conn, principal.project_id, bank_id, since, limit)
    return JSONResponse(asdict(found))


@router.get("/{bank_id}/snapshot", responses={200: {"content": {ARROW_STREAM: {}}}})
def snapshot(
    request: Request,
    bank_id: int = id_path(),
    principal: Principal = Depends(reader),
    conn: psycopg.Connection = Depends(get_conn),
) -> ArrowStreamResponse:
    """The whole bank as an Arrow stream; its schema metadata carries the bank version it shows, and
    its last, empty record batch the row count ('eidetic.end'); a stream that fails is cut off without it."""
    settings: Settings = request.app.state.settings
    bank = memory.get_bank(conn, principal.project_id, bank_id)
    pool = request.app.state.pool
    return ArrowStreamResponse(_snapshot_stream(pool, principal.project_id, bank, settings, request_deadline(request)))


def _snapshot_stream(pool, project_id: int, bank: memory.Bank, settings: Settings, deadline: float) -> Iterator[bytes]:
    with pool.connection(timeout=max(deadline - time.monotonic(), 0.001)) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        current = memory.get_bank(conn, project_id, bank.id)
        value_type = pa.list_(pa.float32(), current.value_dim) if current.value_dim else pa.list_(pa.float32())
        schema = pa.schema(
            [
                pa.field("id", pa.int64()),
                pa.field("key", pa.list_(pa.float32(), current.dim)),
                pa.field("label", pa.int32()),
                pa.field("value", value_type),
                pa.field("confidence", pa.float32()),
                pa.field("hits", pa.int64()),
                pa.field("version", pa.int64()),
                pa.field("rank", pa.int32()),
            ],
            metadata={b"bank_version": str(current.version).encode(), b"metric": current.metric.encode()},
        )
        chunks = memory.snapshot_rows(conn, current, chunk_rows=settings.stream_window_rows)
        chunks = within_deadline(conn, chunks, deadline, settings.statement_timeout_ms)
        batches = (_snapshot_batch(rows, schema, current.dim) for rows in chunks)
        yield from ipc_stream(schema, batches)


def _snapshot_batch(rows: list[tuple], schema: pa.Schema, dim: int) -> pa.RecordBatch:
    columns = list(zip(*rows))
    keys = np.stack(columns[1]).astype(np.float32).reshape(-1)
    values = [None if v is None else v.tolist() for v in columns[3]]
    arrays = [
        pa.array(columns[0], pa.int64()),
        pa.FixedSizeListArray.from_arrays(pa.array(keys), dim),
        pa.array(columns[2], pa.int32()),
        pa.array(values, schema.field("value").type),
        pa.array(columns[4], pa.float32()),
        pa.array(columns[5], pa.int64()),
        pa.array(columns[6], pa.int64()),
        pa.array(columns[7], pa.int32()),
    ]
    return pa.record_batch(arrays, schema=schema)
