"""Ingest: exactly-once, all-or-nothing storage of one batch of activations.

Shared by the REST route and by trusted workers that COPY straight into the database,
so both transports obey the same ledger and the same checks.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg
from psycopg import sql

from app.copy_binary import COPY_COLUMNS, iter_copy_chunks
from app.database import one_row
from app.runs import Layer, layer_partition
from app.settings import Settings
from app.sketches import record_batch
from eidetic.errors import Conflict, DimensionMismatch, InvalidInput, PayloadTooLarge
from eidetic.wire.rows import ActivationRows, InvalidRows, check_task_names, rows_digest
from eidetic.wire.text import text_problem
from eidetic.wire.vectors import require_finite

MAX_BATCH_ID_LENGTH = 200
_COPY_STATEMENT = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)")


@dataclass(frozen=True)
class IngestResult:
    batch_id: str
    rows: int
    duplicate: bool


def choose_batch_id(from_query: str | None, from_body: str | None) -> str:
    """The batch id a request names (query or body), or a fresh one when it names none.

    An empty id is refused rather than replaced: a caller that meant to name its batch
    would lose safe retries without noticing.
    """
    named = {batch_id for batch_id in (from_query, from_body) if batch_id is not None}
    if len(named) > 1:
        raise InvalidInput(f"the query names batch {from_query!r}, the body {from_body!r}", field="batch_id")
    return validate_batch_id(named.pop()) if named else uuid.uuid4().hex


def validate_rows(rows: ActivationRows, layer: Layer, *, max_rows: int, reject_non_finite: bool = True) -> None:
    """Checks a batch before anything is written; the error names the first offending field."""
    if rows.n_rows == 0:
        raise InvalidInput("a batch needs at least one row", field="rows")
    if rows.n_rows > max_rows:
        raise PayloadTooLarge(f"a batch holds at most {max_rows} rows, got {rows.n_rows}", field="rows")
    if rows.dim != layer.dim:
        raise DimensionMismatch(
            f"layer {layer.name!r} has dimension {layer.dim}, the rows have {rows.dim}", field="rows[0].values"
        )
    if reject_non_finite:
        require_finite(rows.values, "rows[{}].values")
    try:
        check_task_names(rows)
    except InvalidRows as error:
        raise InvalidInput(error.message, field=error.field) from error


def store_batch(
    conn: psycopg.Connection, layer: Layer, batch_id: str, rows: ActivationRows, settings: Settings
) -> IngestResult:
    """Checks a batch under the service's limits and stores it: what every transport calls."""
    validate_rows(rows, layer, max_rows=settings.max_rows_per_batch, reject_non_finite=settings.reject_non_finite)
    return ingest(conn, layer, batch_id, rows)


def validate_batch_id(batch_id: str) -> str:
    problem = text_problem(batch_id, MAX_BATCH_ID_LENGTH) if isinstance(batch_id, str) else "must be a string"
    if problem is not None:
        raise InvalidInput(f"a batch id {problem}", field="batch_id")
    return batch_id


def ingest(conn: psycopg.Connection, layer: Layer, batch_id: str, rows: ActivationRows) -> IngestResult:
    """Stores the batch once: a retry of an acknowledged batch id is acknowledged again, not copied.

    Runs in one transaction: the ledger row and every activation row commit together
    or not at all. A concurrent retry of the same id waits on the ledger's unique key.
    The ledger keeps a digest of the content: a batch id reused for other rows is a
    409 `batch_id_conflict`, never a silent duplicate (batches stored before digests
    were kept are compared by row count only).
    On an autocommit connection (as `app.database` makes them) the batch is committed
    when this returns; inside a caller's transaction it is a savepoint of it.
    A sketched layer's batch also goes on the sketch ledger, in the same transaction: its
    sketches are built later, off this path (`app.sketches`).
    """
    validate_batch_id(batch_id)
    digest = rows_digest(rows)
    with conn.transaction():
        inserted = conn.execute(
            "INSERT INTO ingest_batches (run_id, layer_id, batch_id, row_count, digest) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING RETURNING id",  # the one key that can clash: (layer_id, batch_id)
            (layer.run_id, layer.id, batch_id, rows.n_rows, digest),
        ).fetchone()
        if inserted is None:
            stored_rows, stored_digest = one_row(
                conn.execute(
                    "SELECT row_count, digest FROM ingest_batches "
                    "WHERE run_id = %s AND layer_id = %s AND batch_id = %s",
                    (layer.run_id, layer.id, batch_id),
                )
            )
            if stored_rows != rows.n_rows or (stored_digest is not None and bytes(stored_digest) != digest):
                raise Conflict(
                    f"batch {batch_id!r} was stored with other content ({stored_rows} rows); "
                    f"this one has {rows.n_rows} rows: send new rows under a new batch id",
                    field="batch_id",
                    code="batch_id_conflict",
                )
            return IngestResult(batch_id=batch_id, rows=stored_rows, duplicate=True)
        batch_seq = int(inserted[0])
        copy_rows(conn, layer, batch_seq, rows)
        if layer.sketch:
            record_batch(conn, layer, batch_seq, rows)
    return IngestResult(batch_id=batch_id, rows=rows.n_rows, duplicate=False)


def copy_rows(conn: psycopg.Connection, layer: Layer, batch_seq: int, rows: ActivationRows) -> None:
    """Binary COPY straight into the layer's partition (no tuple routing through the parent)."""
    statement = _COPY_STATEMENT.format(
        layer_partition(layer.run_id, layer.id), sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS))
    )
    with conn.cursor().copy(statement) as copy:
        for chunk in iter_copy_chunks(rows, layer.run_id, layer.id, batch_seq):
            copy.write(chunk)
