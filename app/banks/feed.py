"""What a cache follows: the change feed (items and tombstones after a version) and the whole-bank snapshot."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.rows import dict_row

from app.banks.schema import Bank, get_bank, items_partition
from eidetic.wire.meta import encode_meta

_ITEM_COLUMNS = "id, key, label, value, confidence, version, inserted_rank AS rank, meta"


@dataclass(frozen=True)
class Changes:
    items: list[dict]
    tombstones: list[dict]
    version: int
    next_since: int | None


def changes(conn: psycopg.Connection, project_id: int, bank_id: int, *, since: int, limit: int) -> Changes:
    """Items written and tombstones left after `since`, whole versions at a time, in version order.

    A page ends at a version boundary (unless one version alone holds more than `limit`
    items), so a cache that applies a page and asks again from `next_since` misses nothing.
    """
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        bank = get_bank(conn, project_id, bank_id)
        partition = items_partition(bank.id)
        rows = (
            conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL(f"SELECT {_ITEM_COLUMNS} FROM {{}} WHERE version > %s ORDER BY version, id LIMIT %s").format(
                    partition
                ),
                (since, limit + 1),
            )
            .fetchall()
        )
        upto = bank.version
        next_since = None
        if len(rows) > limit:
            last_version = rows[limit]["version"]
            upto = last_version - 1 if last_version > rows[0]["version"] else last_version
            if upto == last_version:  # one version larger than a page: send it whole
                rows = (
                    conn.cursor(row_factory=dict_row)
                    .execute(
                        sql.SQL(f"SELECT {_ITEM_COLUMNS} FROM {{}} WHERE version = %s ORDER BY id").format(partition),
                        (upto,),
                    )
                    .fetchall()
                )
            else:
                rows = [row for row in rows if row["version"] <= upto]
            next_since = upto if upto < bank.version else None
        tombstones = (
            conn.cursor(row_factory=dict_row)
            .execute(
                "SELECT item_id AS id, version FROM memory_tombstones WHERE bank_id = %s AND version > %s "
                "AND version <= %s ORDER BY version, item_id",
                (bank.id, since, upto),
            )
            .fetchall()
        )
    items = [
        row
        | {
            "key": _as_array(row["key"]).tolist(),
            "value": None if row["value"] is None else _as_array(row["value"]).tolist(),
        }
        for row in rows
    ]
    return Changes(items, tombstones, upto, next_since)


def _as_array(value: Any) -> np.ndarray:
    return value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value, dtype=np.float32)


# ---------------------------------------------------------------- snapshot


def snapshot_schema(bank: Bank) -> pa.Schema:
    """The snapshot's Arrow schema; its metadata carries the bank version the snapshot shows, and the metric.
    `meta` is each item's meta as compact JSON text (null where it has none)."""
    value_type = pa.list_(pa.float32(), bank.value_dim) if bank.value_dim else pa.list_(pa.float32())
    return pa.schema(
        [
            pa.field("id", pa.int64()),
            pa.field("key", pa.list_(pa.float32(), bank.dim)),
            pa.field("label", pa.int32()),
            pa.field("value", value_type),
            pa.field("confidence", pa.float32()),
            pa.field("hits", pa.int64()),
            pa.field("version", pa.int64()),
            pa.field("rank", pa.int32()),
            pa.field("meta", pa.string(), metadata={b"encoding": b"json"}),
        ],
        metadata={b"bank_version": str(bank.version).encode(), b"metric": bank.metric.encode()},
    )


def snapshot_batches(conn: psycopg.Connection, bank: Bank, *, chunk_rows: int = 8192) -> Iterator[pa.RecordBatch]:
    """The bank's items in id order, a record batch per chunk (call inside a repeatable-read transaction).

    A chunk is a statement of its own, keyset by id, rather than a fetch from one server-side
    cursor: a Citus coordinator materialises a cursor's whole result before its first fetch
    (the whole bank, spilled to its disk), whereas a statement with a LIMIT costs a chunk on
    every server. The transaction's snapshot keeps the chunks consistent with each other.
    """
    schema = snapshot_schema(bank)
    statement = sql.SQL(
        "SELECT m.id, m.key, m.label, m.value, m.confidence, coalesce(h.hits, 0) AS hits, m.version, "
        "m.inserted_rank AS rank, m.meta FROM {} m "
        "LEFT JOIN memory_hits h ON h.bank_id = m.bank_id AND h.item_id = m.id "
        "WHERE m.bank_id = %s AND m.id > %s ORDER BY m.id LIMIT %s"
    ).format(items_partition(bank.id))
    cursor = conn.cursor(row_factory=dict_row)
    after = -1
    while True:
        rows = cursor.execute(statement, (bank.id, after, chunk_rows)).fetchall()
        if not rows:
            return
        yield _snapshot_batch(rows, schema, bank.dim)
        if len(rows) < chunk_rows:
            return
        after = rows[-1]["id"]


def _snapshot_batch(rows: list[dict], schema: pa.Schema, dim: int) -> pa.RecordBatch:
    def column(name: str) -> list:
        return [row[name] for row in rows]

    keys = np.stack([_as_array(key) for key in column("key")]).astype(np.float32).reshape(-1)
    values = [None if v is None else _as_array(v).tolist() for v in column("value")]
    arrays = [
        pa.array(column("id"), pa.int64()),
        pa.FixedSizeListArray.from_arrays(pa.array(keys), dim),
        pa.array(column("label"), pa.int32()),
        pa.array(values, schema.field("value").type),
        pa.array(column("confidence"), pa.float32()),
        pa.array(column("hits"), pa.int64()),
        pa.array(column("version"), pa.int64()),
        pa.array(column("rank"), pa.int32()),
        pa.array([None if meta is None else encode_meta(meta) for meta in column("meta")], pa.string()),
    ]
    return pa.record_batch(arrays, schema=schema)
