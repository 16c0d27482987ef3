"""Memory banks: create, write under the bank's policy, batched search, change feed and snapshot."""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from psycopg_pool import ConnectionPool
from pydantic import ValidationError

from app import banks
from app.deadline import request_deadline, within_deadline
from app.deps import Conn, Id, Reader, Writer, read_body
from app.openapi import error_responses
from app.schemas import (
    BankCreate,
    BankList,
    BankOut,
    BankVersionOut,
    ChangesOut,
    ItemsIn,
    NeighboursOut,
    SearchIn,
    SearchOut,
    SegmentOut,
    SegmentsOut,
    WriteOut,
)
from app.settings import Settings
from app.streams import ArrowStreamResponse
from eidetic.errors import Conflict, InvalidInput, UnsupportedMediaType
from eidetic.wire import formats
from eidetic.wire.bank_items import items_from_arrow
from eidetic.wire.formats import ARROW_STREAM, ipc_stream
from eidetic.wire.vectors import as_float32

router = APIRouter(prefix="/v1/memory-banks", tags=["memory banks"])


def bank_out(bank: banks.Bank) -> BankOut:
    return BankOut.model_validate(bank, from_attributes=True)


@router.post("", status_code=201, response_model=BankOut, responses=error_responses(409))
def create_bank(body: BankCreate, principal: Writer, conn: Conn) -> BankOut:
    return bank_out(banks.create_bank(conn, project_id=principal.project_id, **body.model_dump()))


@router.get("", response_model=BankList)
def list_banks(principal: Reader, conn: Conn) -> BankList:
    return BankList(banks=[bank_out(bank) for bank in banks.list_banks(conn, principal.project_id)])


@router.get("/{bank_id}", response_model=BankOut)
def get_bank(bank_id: Id, principal: Reader, conn: Conn) -> BankOut:
    return bank_out(banks.get_bank(conn, principal.project_id, bank_id))


@router.delete("/{bank_id}", status_code=204)
def delete_bank(request: Request, bank_id: Id, principal: Writer, conn: Conn) -> Response:
    banks.delete_bank(conn, principal.project_id, bank_id)
    request.app.state.growing_cache.forget(bank_id)  # this process's; the others let it go as memory runs short
    return Response(status_code=204)


_ITEMS_BODY = {
    "requestBody": {
        "required": True,
        "description": "JSON, or an Arrow IPC stream (bulk) with columns key (list of float32), and optionally "
        "label (integer), value (list of float32), confidence (float) and meta (a JSON object as text).",
        "content": {
            formats.JSON: {"schema": {"$ref": f"#/components/schemas/{ItemsIn.__name__}"}},
            formats.ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("/{bank_id}/items", response_model=WriteOut, openapi_extra=_ITEMS_BODY, responses=error_responses(415))
async def write_items(request: Request, bank_id: Id, principal: Writer, conn: Conn) -> WriteOut:
    """Writes a batch atomically under the bank's replacement policy; each item may carry a JSON `meta`."""
    settings: Settings = request.app.state.settings
    body = await read_body(request, settings.max_body_bytes)
    kind = formats.media_type(request.headers.get("content-type"))

    def store() -> banks.WriteResult:
        items = _items_from_body(kind, body)
        if len(items.keys) > settings.max_items_per_write:
            raise InvalidInput(f"at most {settings.max_items_per_write} items per write", field="items")
        return banks.write_items(conn, principal.project_id, bank_id, items, timeout_ms=settings.scan_timeout_ms)

    return WriteOut(**asdict(await run_in_threadpool(store)))


def _items_from_body(kind: str, body: bytes) -> banks.NewItems:
    """The items of a JSON or Arrow body, in the one shape the bank's policy path takes."""
    if kind == formats.ARROW_STREAM:
        return banks.NewItems(**asdict(items_from_arrow(body)))
    if kind != formats.JSON:
        raise UnsupportedMediaType(f"send {formats.JSON} or {formats.ARROW_STREAM}, not {kind!r}", field="Content-Type")
    try:  # parsed and validated as FastAPI does a declared body, so the answers to bad input stay the same
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = error.pos if isinstance(error, json.JSONDecodeError) else error.start
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", where), "msg": "JSON decode error", "input": {}}]
        ) from error
    try:
        parsed = ItemsIn.model_validate(document)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from error
    width = len(parsed.items[0].key)
    for i, item in enumerate(parsed.items):
        if len(item.key) != width:
            raise InvalidInput(
                f"item {i} has a key of {len(item.key)} values, item 0 of {width}", field=f"items[{i}].key"
            )
    return banks.NewItems(
        keys=as_float32([item.key for item in parsed.items]),
        labels=[item.label for item in parsed.items],
        values=[None if item.value is None else as_float32(item.value) for item in parsed.items],
        confidences=[item.confidence for item in parsed.items],
        metas=[item.meta for item in parsed.items] if any(item.meta is not None for item in parsed.items) else None,
    )


@router.delete("/{bank_id}/items/{item_id}", response_model=BankVersionOut)
def delete_item(bank_id: Id, item_id: Id, principal: Writer, conn: Conn) -> BankVersionOut:
    """Removes one item; a tombstone at the new bank version tells the caches."""
    return BankVersionOut(version=banks.delete_item(conn, principal.project_id, bank_id, item_id))


@router.post("/{bank_id}/search", response_model=SearchOut, response_model_exclude_unset=True)
def search(body: SearchIn, request: Request, bank_id: Id, principal: Reader, conn: Conn) -> SearchOut:
    """k nearest items of each query, with a similarity-weighted prediction and its confidence
    (and each neighbour's meta, `metas`, with `with_meta`)."""
    settings: Settings = request.app.state.settings
    if body.k > settings.max_search_k:
        raise InvalidInput(f"k is at most {settings.max_search_k}", field="k")
    if len(body.queries) > settings.max_search_queries:
        raise InvalidInput(f"at most {settings.max_search_queries} queries per request", field="queries")
    bank = banks.get_bank(conn, principal.project_id, bank_id)
    for i, query in enumerate(body.queries):
        if len(query) != bank.dim:
            raise InvalidInput(
                f"query {i} has {len(query)} values; the bank's keys have {bank.dim}", field=f"queries[{i}]"
            )
    queries = as_float32(body.queries)
    answers = banks.search(
        conn,
        bank,
        queries,
        body.k,
        exact=body.exact,
        ef_search=body.ef_search,
        labels=body.labels,
        with_meta=body.with_meta,
        growing_cache=request.app.state.growing_cache,
    )
    banks.record_hits(conn, bank, answers)
    return SearchOut(results=[_neighbours_out(answer) for answer in answers])


def _neighbours_out(answer: banks.Neighbours) -> NeighboursOut:
    """The answer of one query; `metas` is left unset (so left out of the JSON) unless they were asked for."""
    fields = asdict(answer)
    if fields["metas"] is None:
        del fields["metas"]
    return NeighboursOut(**fields)


@router.post(
    "/{bank_id}/merge",
    response_model=SegmentsOut,
    responses={**error_responses(409), 202: {"model": SegmentsOut, "description": "Merge started (`wait=false`)."}},
)
def merge(
    request: Request,
    response: Response,
    bank_id: Id,
    principal: Writer,
    conn: Conn,
    full: Annotated[bool, Query(description="Compact every sealed segment into one.")] = False,
    wait: Annotated[
        bool,
        Query(
            description="Answer when the merge is done (the default), or at once with 202 and the segments as they "
            "are, the merge going on in the service (a large bank's build outlasts the request deadline); "
            "`GET .../segments` shows when it is done."
        ),
    ] = True,
) -> SegmentsOut:
    """Seals the bank's growing segment now, whatever its size, into an HNSW segment built in bulk, then
    compacts sealed segments as the background merger would, or all of them into one with `full` (it
    waits for a merge in progress). Writes and searches go on meanwhile; 409 for a bank without segments
    (`merge_threshold` 0)."""
    bank = banks.get_bank(conn, principal.project_id, bank_id)
    if not bank.segmented:
        raise Conflict(f"bank {bank.name!r} has no segments (merge_threshold 0)", field="bank_id")
    database_url, settings = request.app.state.database_url, request.app.state.settings
    if not wait:
        banks.start_merge(database_url, settings, bank.id, full=full)
        response.status_code = 202
        return segments(bank_id, principal, conn)
    return _segments_out(banks.merge_now(database_url, settings, bank.id, force=True, full=full, wait=True))


@router.get("/{bank_id}/segments", response_model=SegmentsOut)
def segments(bank_id: Id, principal: Reader, conn: Conn) -> SegmentsOut:
    """The bank's sealed segments (each a version range with its own HNSW index) and its growing items."""
    bank = banks.get_bank(conn, principal.project_id, bank_id)
    sealed = banks.sealed_segments(conn, bank.id) if bank.segmented else []
    growing = banks.growing_rows(conn, bank.id, sealed) if bank.segmented else 0
    return _segments_out(banks.MergeReport(False, segments=sealed, growing_rows=growing))


def _segments_out(report: banks.MergeReport) -> SegmentsOut:
    return SegmentsOut(
        merged=report.merged,
        sealed_rows=report.sealed_rows,
        compacted_segments=report.compacted_segments,
        segments=[SegmentOut(**asdict(segment)) for segment in report.segments],
        growing_rows=report.growing_rows,
    )


@router.get("/{bank_id}/changes", response_model=ChangesOut)
def changes(
    bank_id: Id,
    principal: Reader,
    conn: Conn,
    since: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> ChangesOut:
    """What changed after version `since`: items (written or replaced) and tombstones, in version order."""
    return ChangesOut(**asdict(banks.changes(conn, principal.project_id, bank_id, since=since, limit=limit)))


@router.get("/{bank_id}/snapshot", responses={200: {"content": {ARROW_STREAM: {}}}})
def snapshot(request: Request, bank_id: Id, principal: Reader, conn: Conn) -> ArrowStreamResponse:
    """The whole bank as an Arrow stream; its schema metadata carries the bank version it shows, and
    its last, empty record batch the row count ('eidetic.end'); a stream that fails is cut off without it."""
    settings: Settings = request.app.state.settings
    bank = banks.get_bank(conn, principal.project_id, bank_id)
    stream = _snapshot_stream(request.app.state.pool, principal.project_id, bank, settings, request_deadline(request))
    return ArrowStreamResponse(stream)


def _snapshot_stream(
    pool: ConnectionPool, project_id: int, bank: banks.Bank, settings: Settings, deadline: float
) -> Generator[bytes, None, None]:
    with pool.connection(timeout=max(deadline - time.monotonic(), 0.001)) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        current = banks.get_bank(conn, project_id, bank.id)
        batches = banks.snapshot_batches(conn, current, chunk_rows=settings.stream_window_rows)
        yield from ipc_stream(
            banks.snapshot_schema(current), within_deadline(conn, batches, deadline, settings.statement_timeout_ms)
        )
