"""Bank definitions: the `memory_banks` row, and each bank's partition of `memory_items` with its HNSW index.

pgvector indexes need a fixed dimension, so every bank gets its own partition and HNSW
indexes on `key::vector(dim)` with the operator class of its metric: one live index over
the whole partition (`merge_threshold` 0), or one per sealed segment, built by
`app.banks.segments` (a segmented bank, the default).

A bank named for a run's islands (`eidetic.wire.islands`: `run-{run}/islands/...`)
belongs to that run: it can only be created for a run of the bank's project, and
`app.runs.delete_run` deletes it with the run. The name is the link rather than a
foreign key because on Citus banks and runs are distributed by their own ids, and a
foreign key between them would cross distribution keys.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from app.database import lock_name
from eidetic.errors import Conflict, InvalidInput, NotFound
from eidetic.wire.islands import parse_island_bank_name

METRICS = ("cosine", "l2", "ip")
DEFAULT_MERGE_THRESHOLD = 5000  # growing items that start a merge: an exact scan of them costs about one HNSW search
DEFAULT_MERGE_FACTOR = 4  # sealed segments of one size tier compacted into one
OPCLASS = {"cosine": "vector_cosine_ops", "l2": "vector_l2_ops", "ip": "vector_ip_ops"}


@dataclass(frozen=True)
class Bank:
    id: int
    project_id: int
    name: str
    dim: int
    value_dim: int | None
    metric: str
    capacity: int
    policy: str
    similarity_threshold: float
    version: int
    size: int
    created_at: datetime
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    merge_threshold: int = 0
    merge_factor: int = DEFAULT_MERGE_FACTOR

    @property
    def segmented(self) -> bool:
        """New items land in a growing segment that a merge seals; else every write goes into one live index."""
        return self.merge_threshold > 0


_BANK_COLUMNS = (
    "id, project_id, name, dim, value_dim, metric, capacity, policy, similarity_threshold, version, size, created_at, "
    "hnsw_m, hnsw_ef_construction, merge_threshold, merge_factor"
)


def items_partition(bank_id: int) -> sql.Identifier:
    return sql.Identifier(f"memory_items_b{int(bank_id)}")


def create_bank(
    conn: psycopg.Connection,
    *,
    project_id: int,
    name: str,
    dim: int,
    metric: str,
    capacity: int,
    policy: str,
    similarity_threshold: float,
    value_dim: int | None = None,
    hnsw_m: int = 16,
    hnsw_ef_construction: int = 64,
    merge_threshold: int = DEFAULT_MERGE_THRESHOLD,
    merge_factor: int = DEFAULT_MERGE_FACTOR,
) -> Bank:
    """A bank and its partition; an unsegmented bank (`merge_threshold` 0) gets its live HNSW index
    (m, ef_construction) now, a segmented one an index per sealed segment as merges seal them."""
    with conn.transaction():
        lock_name(conn, "bank", project_id, name)
        _hold_owning_run(conn, project_id, name)
        taken = conn.execute(
            "SELECT 1 FROM memory_banks WHERE project_id = %s AND name = %s", (project_id, name)
        ).fetchone()
        bank = (
            None
            if taken
            else (
                conn.cursor(row_factory=class_row(Bank))
                .execute(
                    f"INSERT INTO memory_banks (project_id, name, dim, value_dim, metric, capacity, policy, "
                    f"similarity_threshold, hnsw_m, hnsw_ef_construction, merge_threshold, merge_factor) "
                    f"VALUES (%(project_id)s, %(name)s, %(dim)s, %(value_dim)s, %(metric)s, %(capacity)s, %(policy)s, "
                    f"%(similarity_threshold)s, %(hnsw_m)s, %(hnsw_ef_construction)s, %(merge_threshold)s, "
                    f"%(merge_factor)s) ON CONFLICT DO NOTHING RETURNING {_BANK_COLUMNS}",
                    {
                        "project_id": project_id,
                        "name": name,
                        "dim": dim,
                        "value_dim": value_dim,
                        "metric": metric,
                        "capacity": capacity,
                        "policy": policy,
                        "similarity_threshold": similarity_threshold,
                        "hnsw_m": hnsw_m,
                        "hnsw_ef_construction": hnsw_ef_construction,
                        "merge_threshold": merge_threshold,
                        "merge_factor": merge_factor,
                    },
                )
                .fetchone()
            )
        )
        if bank is None:
            raise Conflict(f"a memory bank named {name!r} already exists in this project", field="name")
        partition = items_partition(bank.id)
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF memory_items FOR VALUES IN ({})").format(
                partition, sql.Literal(bank.id)
            )
        )
        if not bank.segmented:
            conn.execute(hnsw_index(bank, sql.Identifier(f"memory_items_b{bank.id}_hnsw")))
    return bank


def hnsw_index(
    bank: Bank, name: sql.Identifier, *, where: sql.Composable | None = None, concurrently: bool = False
) -> sql.Composed:
    """The CREATE INDEX of an HNSW index on the bank's keys (a segment's: partial, `where` its versions)."""
    return sql.SQL(
        "CREATE INDEX {concurrently}{name} ON {items} USING hnsw ((key::vector({dim})) {opclass}) "
        "WITH (m = {m}, ef_construction = {ef}){where}"
    ).format(
        concurrently=sql.SQL("CONCURRENTLY " if concurrently else ""),
        name=name,
        items=items_partition(bank.id),
        dim=sql.Literal(bank.dim),
        opclass=sql.SQL(OPCLASS[bank.metric]),
        m=sql.Literal(bank.hnsw_m),
        ef=sql.Literal(bank.hnsw_ef_construction),
        where=sql.SQL("") if where is None else sql.SQL(" WHERE {}").format(where),
    )


def _hold_owning_run(conn: psycopg.Connection, project_id: int, name: str) -> None:
    """A bank named for a run's islands needs that run in the bank's project; its row is held (FOR SHARE) until
    commit, so a concurrent `delete_run` waits for the bank and then deletes it, never leaving it behind."""
    run_id = _owning_run(name)
    if run_id is None:
        return
    found = conn.execute(
        "SELECT 1 FROM runs WHERE id = %s AND project_id = %s FOR SHARE", (run_id, project_id)
    ).fetchone()
    if found is None:
        raise InvalidInput(
            f"a bank named {name!r} holds the islands of run {run_id}, which is not a run of this project",
            field="name",
        )


def run_banks(conn: psycopg.Connection, project_id: int, run_id: int) -> list[Bank]:
    """The banks that belong to a run of the project (its island banks, by name), by id."""
    statement = f"SELECT {_BANK_COLUMNS} FROM memory_banks WHERE project_id = %s AND name LIKE %s ORDER BY id"
    found = conn.cursor(row_factory=class_row(Bank)).execute(statement, (project_id, f"run-{int(run_id)}/islands/%"))
    return [bank for bank in found.fetchall() if _owning_run(bank.name) == run_id]


def _owning_run(name: str) -> int | None:
    parsed = parse_island_bank_name(name)
    return None if parsed is None else parsed[0]


def get_bank(conn: psycopg.Connection, project_id: int, bank_id: int, *, lock: bool = False) -> Bank:
    """A bank of the caller's project; another project's bank is not found. `lock`: hold its row (writes)."""
    statement = f"SELECT {_BANK_COLUMNS} FROM memory_banks WHERE id = %s AND project_id = %s"
    bank = (
        conn.cursor(row_factory=class_row(Bank))
        .execute(statement + (" FOR UPDATE" if lock else ""), (bank_id, project_id))
        .fetchone()
    )
    if bank is None:
        raise NotFound(f"memory bank {bank_id} not found", field="bank_id")
    return bank


def bank_by_id(conn: psycopg.Connection, bank_id: int) -> Bank | None:
    """A bank whatever its project (the service's own work, such as merges), or None once deleted."""
    statement = f"SELECT {_BANK_COLUMNS} FROM memory_banks WHERE id = %s"
    return conn.cursor(row_factory=class_row(Bank)).execute(statement, (bank_id,)).fetchone()


def list_banks(conn: psycopg.Connection, project_id: int) -> list[Bank]:
    statement = f"SELECT {_BANK_COLUMNS} FROM memory_banks WHERE project_id = %s ORDER BY id"
    return conn.cursor(row_factory=class_row(Bank)).execute(statement, (project_id,)).fetchall()


MERGE_LOCK = "SELECT {}(hashtextextended('eidetic:bank-merge', %s))"  # a bank's merge lock (session-level)


def try_merge_lock(conn: psycopg.Connection, bank_id: int) -> bool:
    """Takes the bank's merge lock if no merge holds it; a merger that dies lets it go."""
    row = conn.execute(sql.SQL(MERGE_LOCK).format(sql.Identifier("pg_try_advisory_lock")), (bank_id,)).fetchone()
    return bool(row and row[0])


def merge_unlock(conn: psycopg.Connection, bank_id: int) -> None:
    conn.execute(sql.SQL(MERGE_LOCK).format(sql.Identifier("pg_advisory_unlock")), (bank_id,))


def _cancel_merges(conn: psycopg.Connection, bank_id: int) -> None:
    """Takes the bank's merge lock, cancelling the merge that holds it (the deletion drops what it built).

    A merge's CREATE INDEX CONCURRENTLY waits for every older transaction, and a transaction that
    drops the partition waits for the build: the merge has to be out of the way first.
    """
    while not try_merge_lock(conn, bank_id):
        conn.execute(
            "SELECT pg_cancel_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND ((classid::bigint << 32) | objid::bigint) = hashtextextended('eidetic:bank-merge', %s)",
            (bank_id,),
        )
        time.sleep(0.05)


def delete_bank(conn: psycopg.Connection, project_id: int, bank_id: int) -> None:
    """Drops the bank's partition (its items) and its row, under the row lock so no write is half done,
    and with no merge of it running."""
    get_bank(conn, project_id, bank_id)
    _cancel_merges(conn, bank_id)
    try:
        with conn.transaction():
            get_bank(conn, project_id, bank_id, lock=True)
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(items_partition(bank_id)))
            conn.execute("DELETE FROM memory_banks WHERE id = %s", (bank_id,))
    finally:
        merge_unlock(conn, bank_id)
