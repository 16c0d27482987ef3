"""Writes to a bank: the replacement policy's plan applied under the bank's row lock, and deletions.

The row lock makes the policy, the capacity and the version hold under any number of
concurrent writers; every change bumps the bank version in the same transaction, which
makes `since=version` a complete change feed. What to insert, replace or skip is decided
by `eidetic.wire.bank_policy`, the planner the device memories use too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from pgvector import Vector
from psycopg import sql
from psycopg.rows import dict_row, scalar_row
from psycopg.types.json import Jsonb

from app.banks.copy_items import COPY_ITEM_COLUMNS, encode_items
from app.banks.schema import Bank, get_bank, items_partition
from app.copy_binary import iter_vectors
from eidetic.errors import DimensionMismatch, InvalidInput, NonFiniteValue, NotFound
from eidetic.wire.bank_policy import (
    BankState,
    Batch,
    Similarities,
    WritePlan,
    encode_confidences,
    encode_labels,
    inserted_until_full,
    plan_write,
    policy_named,
    similarity_matrix,
)
from eidetic.wire.vectors import as_float32, require_comparable, require_finite


@dataclass
class NewItems:
    """A batch of items to write: keys (n x dim), labels, optional values, confidences and metas (checked JSON
    objects; None: no item has one)."""

    keys: np.ndarray
    labels: list[int | None]
    values: list[np.ndarray | None]
    confidences: list[float | None]
    metas: list[dict[str, Any] | None] | None = None

    def meta(self, position: int) -> Jsonb | None:
        meta = None if self.metas is None else self.metas[position]
        return None if meta is None else Jsonb(meta)

    def check(self, bank: Bank) -> None:
        if self.keys.ndim != 2 or len(self.keys) == 0:
            raise InvalidInput("items need at least one key", field="items")
        if self.keys.shape[1] != bank.dim:
            raise DimensionMismatch(
                f"bank {bank.name!r} has dimension {bank.dim}, the keys have {self.keys.shape[1]}", field="items[0].key"
            )
        require_comparable(self.keys, bank.metric, "items[{}].key")
        for i, value in enumerate(self.values):
            if value is None:
                continue
            if bank.value_dim is None:
                raise InvalidInput(f"bank {bank.name!r} stores no values", field=f"items[{i}].value")
            if len(value) != bank.value_dim:
                raise DimensionMismatch(
                    f"values of bank {bank.name!r} have {bank.value_dim} entries, not {len(value)}",
                    field=f"items[{i}].value",
                )
            require_finite(as_float32(value)[None, :], f"items[{i}].value")
        for i, confidence in enumerate(self.confidences):
            if confidence is not None and not np.isfinite(confidence):
                raise NonFiniteValue("confidence must be finite", field=f"items[{i}].confidence")


@dataclass(frozen=True)
class WriteResult:
    inserted: int
    replaced: int
    skipped: int
    version: int
    ids: list[int | None] = field(default_factory=list)


@dataclass
class _StoredItems:
    """The bank's items while its row is locked, in id order: their ids, keys, and what the policy looks at."""

    ids: list[int]
    keys: np.ndarray
    state: BankState


def write_items(
    conn: psycopg.Connection, project_id: int, bank_id: int, items: NewItems, *, timeout_ms: int | None = None
) -> WriteResult:
    """Writes a batch atomically under the bank's row lock, each item in order as the bank's policy decides.

    Insert while not full. When full, an item is stored only if it is novel (its best
    similarity is under the threshold) and then replaces, per policy, the lowest-similarity
    item of its class (else overall), the least confident item, or the oldest (fifo).
    """
    with conn.transaction():
        if timeout_ms is not None:  # inserts into a live HNSW index are slow: a large write needs longer
            conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(int(timeout_ms))))
        bank = get_bank(conn, project_id, bank_id, lock=True)
        items.check(bank)
        version = bank.version + 1
        plan, stored_ids = _plan(conn, bank, items, version)
        if not plan.inserted and not plan.replaced:
            return WriteResult(0, 0, plan.skipped, bank.version, [None] * len(items.keys))
        inserts = plan.inserts.tolist()
        new_ids = _insert(conn, bank, items, inserts, version)
        _replace(conn, bank, items, {stored_ids[slot]: position for slot, position in plan.replacements}, version)
        conn.execute(
            "UPDATE memory_banks SET version = %s, size = %s WHERE id = %s",
            (version, bank.size + len(inserts), bank.id),
        )
        _record_size(conn, bank.id, version, bank.size + len(inserts))
    n = plan.bank_size
    ids = [None if s < 0 else new_ids[s - n] if s >= n else stored_ids[s] for s in plan.slots.tolist()]
    return WriteResult(plan.inserted, plan.replaced, plan.skipped, version, ids)


def _plan(conn: psycopg.Connection, bank: Bank, items: NewItems, version: int) -> tuple[WritePlan, list[int]]:
    """The policy's plan, and the ids of the stored items its slots refer to (loaded only when the bank is full)."""
    r = len(items.keys)
    policy = policy_named(bank.policy)
    fits = inserted_until_full(bank_size=bank.size, capacity=bank.capacity, batch_size=r)
    if fits == r or not policy.replaces:
        return WritePlan.until_full(bank_size=bank.size, capacity=bank.capacity, batch_size=r), []
    stored = _load_items(conn, bank)
    batch = Batch(
        labels=encode_labels(items.labels),
        confidences=encode_confidences(items.confidences),
        orders=version * (1 << 32) + np.arange(r, dtype=np.int64),  # this write's version, then place in it
    )
    tail = items.keys[fits:]
    similarities = Similarities(
        to_bank=similarity_matrix(bank.metric, tail, stored.keys),
        among=similarity_matrix(bank.metric, tail, items.keys),
    )
    plan = plan_write(
        policy,
        stored.state,
        batch,
        capacity=bank.capacity,
        similarity_threshold=bank.similarity_threshold,
        similarities=similarities,
    )
    return plan, stored.ids


def _load_items(conn: psycopg.Connection, bank: Bank) -> _StoredItems:
    partition = items_partition(bank.id)
    rows = (
        conn.cursor(row_factory=dict_row)
        .execute(
            sql.SQL("SELECT id, label, confidence, inserted_version, inserted_rank FROM {} ORDER BY id").format(
                partition
            )
        )
        .fetchall()
    )
    keys = np.empty((len(rows), bank.dim), dtype=np.float32)
    filled = 0
    for chunk in iter_vectors(conn, sql.SQL("SELECT key FROM {} ORDER BY id").format(partition), [], bank.dim):
        keys[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    state = BankState(
        labels=encode_labels([row["label"] for row in rows]),
        confidences=encode_confidences([row["confidence"] for row in rows]),
        orders=np.array([(row["inserted_version"] << 32) + row["inserted_rank"] for row in rows], dtype=np.int64),
    )
    return _StoredItems([row["id"] for row in rows], keys, state)


def _vector(value) -> Vector | None:
    return None if value is None else Vector(np.asarray(value, dtype=np.float32))


def _insert(conn: psycopg.Connection, bank: Bank, items: NewItems, positions: list[int], version: int) -> list[int]:
    """Copies the items at `positions` in, in that order; returns the ids they were given."""
    if not positions:
        return []
    partition = items_partition(bank.id)
    ids = (
        conn.cursor(row_factory=scalar_row)
        .execute(
            "SELECT nextval(pg_get_serial_sequence('memory_items', 'id')) FROM generate_series(1, %s)",
            (len(positions),),
        )
        .fetchall()
    )
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        partition, sql.SQL(", ").join(map(sql.Identifier, COPY_ITEM_COLUMNS))
    )
    encoded = encode_items(
        bank_id=bank.id,
        ids=ids,
        positions=positions,
        keys=items.keys,
        labels=items.labels,
        values=items.values,
        confidences=items.confidences,
        metas=items.metas,
        version=version,
    )
    with conn.cursor().copy(statement) as copy:
        copy.write(encoded)
    return ids


def _replace(conn: psycopg.Connection, bank: Bank, items: NewItems, replacements: dict[int, int], version: int) -> None:
    """Overwrites each stored item (id -> position of the item replacing it); a replaced item's hits start afresh."""
    if not replacements:
        return
    statement = sql.SQL(
        "UPDATE {} SET key = %s, label = %s, value = %s, confidence = %s, version = %s, "
        "inserted_version = %s, inserted_rank = %s, meta = %s WHERE id = %s"
    ).format(items_partition(bank.id))
    conn.execute("DELETE FROM memory_hits WHERE bank_id = %s AND item_id = ANY(%s)", (bank.id, list(replacements)))
    with conn.cursor() as cursor:
        cursor.executemany(
            statement,
            [
                (
                    Vector(items.keys[p]),
                    items.labels[p],
                    _vector(items.values[p]),
                    items.confidences[p],
                    version,
                    version,
                    p,
                    items.meta(p),
                    item_id,
                )
                for item_id, p in replacements.items()
            ],
        )


def _record_size(conn: psycopg.Connection, bank_id: int, version: int, size: int) -> None:
    """The bank's size after the change that made `version`, kept for its fill over time (the dashboard)."""
    conn.execute("INSERT INTO memory_bank_sizes (bank_id, version, size) VALUES (%s, %s, %s)", (bank_id, version, size))


def delete_item(conn: psycopg.Connection, project_id: int, bank_id: int, item_id: int) -> int:
    """Removes one item, leaving a tombstone at the new version; returns that version."""
    with conn.transaction():
        bank = get_bank(conn, project_id, bank_id, lock=True)
        deleted = conn.execute(
            sql.SQL("DELETE FROM {} WHERE id = %s RETURNING id").format(items_partition(bank.id)), (item_id,)
        ).fetchone()
        if deleted is None:
            raise NotFound(f"item {item_id} not found in bank {bank_id}", field="item_id")
        version = bank.version + 1
        conn.execute(
            "INSERT INTO memory_tombstones (bank_id, item_id, version) VALUES (%s, %s, %s)", (bank.id, item_id, version)
        )
        conn.execute("DELETE FROM memory_hits WHERE bank_id = %s AND item_id = %s", (bank.id, item_id))
        conn.execute("UPDATE memory_banks SET version = %s, size = size - 1 WHERE id = %s", (version, bank.id))
        _record_size(conn, bank.id, version, bank.size - 1)
    return version
