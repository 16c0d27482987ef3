"""Runs and layers, and the activation partitions that belong to them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from app.banks.schema import delete_bank, run_banks
from app.database import lock_name, one_row
from eidetic.errors import Conflict, NotFound


@dataclass(frozen=True)
class Run:
    id: int
    name: str
    config: dict
    status: str
    created_at: datetime
    metrics: dict


@dataclass(frozen=True)
class Layer:
    id: int
    run_id: int
    name: str
    dim: int
    kind: str
    created_at: datetime
    sketch: bool = True


_RUN_COLUMNS = "id, name, config, status, created_at, metrics"
_LAYER_COLUMNS = "id, run_id, name, dim, kind, created_at, sketch"


def run_partition(run_id: int) -> sql.Identifier:
    return sql.Identifier(f"activations_r{int(run_id)}")


def layer_partition(run_id: int, layer_id: int) -> sql.Identifier:
    return sql.Identifier(f"activations_r{int(run_id)}_l{int(layer_id)}")


def partitioned_by_run(conn: psycopg.Connection) -> bool:
    """Whether activations have a partition per run (one server) or only per layer (Citus: the run is the shard)."""
    return one_row(conn.execute("SELECT pg_get_partkeydef('activations'::regclass)"))[0] == "LIST (run_id)"


def create_run(conn: psycopg.Connection, project_id: int, name: str, config: dict) -> Run:
    with conn.transaction():
        lock_name(conn, "run", project_id, name)
        taken = conn.execute("SELECT 1 FROM runs WHERE project_id = %s AND name = %s", (project_id, name)).fetchone()
        row = (
            None
            if taken
            else conn.execute(
                f"INSERT INTO runs (project_id, name, config) VALUES (%s, %s, %s) "
                f"ON CONFLICT DO NOTHING RETURNING {_RUN_COLUMNS}",
                (project_id, name, Jsonb(config)),
            ).fetchone()
        )
        if row is None:
            raise Conflict(f"a run named {name!r} already exists in this project", field="name")
        run = Run(*row)
        if partitioned_by_run(conn):
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} PARTITION OF activations FOR VALUES IN ({}) PARTITION BY LIST (layer_id)"
                ).format(run_partition(run.id), sql.Literal(run.id))
            )
    return run


def list_runs(conn: psycopg.Connection, project_id: int, limit: int, offset: int) -> list[Run]:
    rows = conn.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE project_id = %s ORDER BY id LIMIT %s OFFSET %s",
        (project_id, limit, offset),
    ).fetchall()
    return [Run(*row) for row in rows]


def get_run(conn: psycopg.Connection, project_id: int, run_id: int, *, lock: bool = False) -> Run:
    """A run of the caller's project; another project's run is not found (its existence is not leaked)."""
    row = conn.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = %s AND project_id = %s" + (" FOR SHARE" if lock else ""),
        (run_id, project_id),
    ).fetchone()
    if row is None:
        raise NotFound(f"run {run_id} not found", field="run_id")
    return Run(*row)


def update_run(
    conn: psycopg.Connection, project_id: int, run_id: int, status: str | None = None, metrics: dict | None = None
) -> Run:
    """Sets the status and merges metrics into the run's (a key given again replaces its value)."""
    row = conn.execute(
        f"UPDATE runs SET status = coalesce(%s, status), metrics = metrics || %s "
        f"WHERE id = %s AND project_id = %s RETURNING {_RUN_COLUMNS}",
        (status, Jsonb(metrics or {}), run_id, project_id),
    ).fetchone()
    if row is None:
        raise NotFound(f"run {run_id} not found", field="run_id")
    return Run(*row)


def delete_run(conn: psycopg.Connection, project_id: int, run_id: int) -> None:
    """Drops the run's partition (all its activations at once, however many), its banks (its island banks, with
    their items, hits and change feed) and its rows, in one transaction. The run's row is locked first, so a bank
    being created for it (`create_bank` holds the row FOR SHARE) is either seen and deleted or refused."""
    with conn.transaction():
        get_run(conn, project_id, run_id)
        conn.execute("SELECT 1 FROM runs WHERE id = %s FOR UPDATE", (run_id,))
        for bank in run_banks(conn, project_id, run_id):
            delete_bank(conn, project_id, bank.id)
        if partitioned_by_run(conn):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(run_partition(run_id)))
        else:
            layer_ids = [row[0] for row in conn.execute("SELECT id FROM layers WHERE run_id = %s", (run_id,))]
            for layer_id in layer_ids:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(layer_partition(run_id, layer_id)))
        conn.execute("DELETE FROM runs WHERE id = %s", (run_id,))


def create_layer(
    conn: psycopg.Connection, project_id: int, run_id: int, name: str, dim: int, kind: str, sketch: bool = True
) -> Layer:
    """A layer and its partition; `sketch` keeps quantile sketches of it up to date on ingest."""
    with conn.transaction():
        get_run(conn, project_id, run_id, lock=True)
        row = conn.execute(
            f"INSERT INTO layers (run_id, name, dim, kind, sketch) VALUES (%s, %s, %s, %s, %s) "
            f"ON CONFLICT (run_id, name) DO NOTHING RETURNING {_LAYER_COLUMNS}",
            (run_id, name, dim, kind, sketch),
        ).fetchone()
        if row is None:
            raise Conflict(f"run {run_id} already has a layer named {name!r}", field="name")
        layer = Layer(*row)
        parent = run_partition(run_id) if partitioned_by_run(conn) else sql.Identifier("activations")
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES IN ({})").format(
                layer_partition(run_id, layer.id), parent, sql.Literal(layer.id)
            )
        )
    return layer


def list_layers(conn: psycopg.Connection, project_id: int, run_id: int) -> list[Layer]:
    get_run(conn, project_id, run_id)
    rows = conn.execute(f"SELECT {_LAYER_COLUMNS} FROM layers WHERE run_id = %s ORDER BY id", (run_id,)).fetchall()
    return [Layer(*row) for row in rows]


def get_layer(conn: psycopg.Connection, project_id: int, run_id: int, layer_id: int) -> Layer:
    get_run(conn, project_id, run_id)
    row = conn.execute(
        f"SELECT {_LAYER_COLUMNS} FROM layers WHERE id = %s AND run_id = %s", (layer_id, run_id)
    ).fetchone()
    if row is None:
        raise NotFound(f"layer {layer_id} not found in run {run_id}", field="layer_id")
    return Layer(*row)


def find_layer(conn: psycopg.Connection, layer_id: int) -> Layer:
    """A layer by id alone, for trusted (direct database) writers that have no API key."""
    row = conn.execute(f"SELECT {_LAYER_COLUMNS} FROM layers WHERE id = %s", (layer_id,)).fetchone()
    if row is None:
        raise NotFound(f"layer {layer_id} not found", field="layer_id")
    return Layer(*row)
