"""The distributed layout on Citus: what `eidetic migrate --distribute` does after `upgrade`.

Projects and API keys are reference tables (a copy on every node). A run's tables
(runs, layers, the ingest ledger, quantile sets, sketches and their ledger, activations) are distributed
by run id and co-located, so everything one ingest touches is on one worker; a bank's
tables (banks, items, tombstones, hits) likewise by bank id.

Citus asks of a distributed table that every unique constraint includes its
distribution column and that foreign keys between distributed tables include it too;
the steps below rewrite the few constraints that did not. Two uniques cannot include it
(a run's and a bank's name in their project): on Citus they are dropped, and
`app.runs.create_run` / `app.banks.create_bank` keep names unique under an advisory lock.
Activations lose their run level of partitioning (Citus distributes one level only):
the run is the shard, a layer is still a partition. On plain PostgreSQL nothing changes.

Idempotent: each step looks before it acts, so running it twice is one run.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from app.database import one_row

log = logging.getLogger(__name__)

REFERENCE_TABLES = ("projects", "api_keys")
# (table, distribution column, co-located with); parents before the tables that refer to them
DISTRIBUTED_TABLES = (
    ("runs", "id", None),
    ("layers", "run_id", "runs"),
    ("ingest_batches", "run_id", "runs"),
    ("quantile_sets", "run_id", "runs"),
    ("layer_sketches", "run_id", "runs"),
    ("sketch_backlog", "run_id", "runs"),
    ("kernel_records", "run_id", "runs"),
    ("activations", "run_id", "runs"),
    ("memory_banks", "id", None),
    ("memory_items", "bank_id", "memory_banks"),
    ("memory_tombstones", "bank_id", "memory_banks"),
    ("memory_hits", "bank_id", "memory_banks"),
    ("memory_segments", "bank_id", "memory_banks"),
    ("memory_bank_sizes", "bank_id", "memory_banks"),
)
# Unique keys rewritten to lead with the run: (table, constraint, new definition)
_RUN_KEYS = (
    ("layers", "layers_pkey", "PRIMARY KEY (run_id, id)"),
    ("ingest_batches", "ingest_batches_pkey", "PRIMARY KEY (run_id, id)"),
    ("ingest_batches", "ingest_batches_layer_id_batch_id_key", "UNIQUE (run_id, layer_id, batch_id)"),
    ("quantile_sets", "quantile_sets_pkey", "PRIMARY KEY (run_id, id)"),
    ("quantile_sets", "quantile_sets_layer_id_version_key", "UNIQUE (run_id, layer_id, version)"),
    ("layer_sketches", "layer_sketches_pkey", "PRIMARY KEY (run_id, layer_id, task)"),
)
_NAME_KEYS = (("runs", "runs_project_id_name_key"), ("memory_banks", "memory_banks_project_id_name_key"))
_LAYER_CHILDREN = ("ingest_batches", "quantile_sets", "layer_sketches", "sketch_backlog")


def has_citus(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'citus'").fetchone() is not None


def table_type(conn: psycopg.Connection, table: str) -> str | None:
    """'distributed', 'reference', 'local' (a Citus-managed local table), or None (plain PostgreSQL)."""
    row = conn.execute("SELECT citus_table_type FROM citus_tables WHERE table_name = to_regclass(%s)", (table,))
    found = row.fetchone()
    return None if found is None else str(found[0])


def distribute(conn: psycopg.Connection) -> bool:
    """Turns a migrated database on Citus into the distributed layout; False (and no change) without Citus."""
    if not has_citus(conn):
        return False
    with conn.transaction():
        # DDL over many shards in one transaction: one connection per worker, in order
        conn.execute("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'")
        _relayout_activations(conn)
        _rewrite_constraints(conn)
    wanted = [(table, "reference") for table in REFERENCE_TABLES]
    wanted += [(table, "distributed") for table, _, _ in DISTRIBUTED_TABLES]
    if any(table_type(conn, table) != kind for table, kind in wanted):
        _place_tables(conn)
    # A search's SET LOCAL (hnsw.ef_search, hnsw.iterative_scan) must reach the worker that runs it:
    # Citus propagates none by default, and the worker would search with its own ef_search.
    conn.execute(
        sql.SQL("ALTER DATABASE {} SET citus.propagate_set_commands = 'local'").format(sql.Identifier(conn.info.dbname))
    )
    log.info("distributed layout in place")
    return True


def _place_tables(conn: psycopg.Connection) -> None:
    """Makes the reference and distributed tables, foreign keys set aside meanwhile.

    With its keys in place, a table that refers to a new reference table would turn into
    a Citus-managed local table, which then cannot be distributed while others refer to it.
    """
    tables = [*REFERENCE_TABLES, *(table for table, _, _ in DISTRIBUTED_TABLES)]
    keys = conn.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE contype = 'f' AND conrelid = ANY(%s::regclass[]) AND conparentid = 0",
        (tables,),
    ).fetchall()
    with conn.transaction():
        conn.execute("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'")
        for table, name, _ in keys:
            conn.execute(
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier(table), sql.Identifier(name))
            )
        for table in REFERENCE_TABLES:
            if table_type(conn, table) != "reference":
                conn.execute("SELECT create_reference_table(%s)", (table,))
        for table, column, colocate_with in DISTRIBUTED_TABLES:
            if table_type(conn, table) != "distributed":
                conn.execute(
                    "SELECT create_distributed_table(%s, %s, colocate_with => %s)",
                    (table, column, colocate_with or "default"),
                )
        for table, name, definition in keys:
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    sql.Identifier(table), sql.Identifier(name), sql.SQL(definition)
                )
            )


def _constraint_exists(conn: psycopg.Connection, table: str, name: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass(%s) AND conname = %s", (table, name)
    ).fetchone()
    return found is not None


def _relayout_activations(conn: psycopg.Connection) -> None:
    """Activations partitioned by layer only (the run is the shard); refused once runs have partitions."""
    key = one_row(conn.execute("SELECT pg_get_partkeydef('activations'::regclass)"))[0]
    if key == "LIST (layer_id)":
        return
    partitions = one_row(conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'activations'::regclass"))[0]
    if partitions:
        raise RuntimeError("--distribute converts a database without runs; this one has activations already")
    conn.execute("DROP TABLE activations")
    conn.execute(
        """
        CREATE TABLE activations (
            run_id      bigint NOT NULL,
            layer_id    bigint NOT NULL,
            batch_seq   bigint NOT NULL,
            row_no      integer NOT NULL,
            sample_id   bigint,
            step        bigint,
            epoch       integer,
            label       integer,
            task        text,
            "values"    vector NOT NULL
        ) PARTITION BY LIST (layer_id)
        """
    )
    conn.execute("CREATE INDEX activations_batch_brin ON activations USING brin (batch_seq)")


def _rewrite_constraints(conn: psycopg.Connection) -> None:
    for table in _LAYER_CHILDREN:  # they refer to layers (id), which is about to become (run_id, id)
        name = f"{table}_layer_id_fkey"
        if _constraint_exists(conn, table, name):
            conn.execute(
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier(table), sql.Identifier(name))
            )
    for table, name in _NAME_KEYS:
        if _constraint_exists(conn, table, name):
            conn.execute(
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier(table), sql.Identifier(name))
            )
    for table, name, definition in _RUN_KEYS:
        done = f"{name}_by_run" if not name.endswith("_pkey") else name
        if name.endswith("_pkey"):
            columns = one_row(
                conn.execute(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conrelid = to_regclass(%s) AND conname = %s",
                    (table, name),
                )
            )[0]
            if columns.startswith("PRIMARY KEY (run_id"):
                continue
            conn.execute(
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier(table), sql.Identifier(name))
            )
        else:
            if _constraint_exists(conn, table, done):
                continue
            conn.execute(
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier(table), sql.Identifier(name))
            )
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                sql.Identifier(table), sql.Identifier(done), sql.SQL(definition)
            )
        )
    for table in _LAYER_CHILDREN:
        name = f"{table}_layer_fkey"
        if not _constraint_exists(conn, table, name):
            conn.execute(
                sql.SQL(
                    "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY (run_id, layer_id) "
                    "REFERENCES layers (run_id, id) ON DELETE CASCADE"
                ).format(sql.Identifier(table), sql.Identifier(name))
            )
