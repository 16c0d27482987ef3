"""Per-unit quantiles of stored activations: exact (numpy over a binary COPY) or from KLL sketches.

Boundary i of Q (i = 1..Q-1) is percentile_disc(i/Q) of the unit's selected values,
numpy's `method="inverted_cdf"`; the bucket of a value is the number of boundaries
strictly below it (torch.bucketize with right=False), so buckets run 0..Q-1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import class_row

from app import sketches
from app.copy_binary import iter_vectors
from app.database import one_row
from app.query import ActivationFilter
from app.runs import Layer, layer_partition
from eidetic.errors import InvalidInput, NotFound, PayloadTooLarge, Unavailable
from eidetic.wire.order_statistics import exact_boundaries_of

METHODS = ("exact", "sketch")


@dataclass(frozen=True)
class QuantileSet:
    id: int
    run_id: int
    layer_id: int
    version: int
    n_quantiles: int
    method: str
    filter: dict
    rows: int
    boundaries: np.ndarray  # units x, float32
    rank_error: float | None
    created_at: datetime
    pending_rows: int | None = None  # sketches: committed rows of the layer not yet in them
    lag_s: float | None = None  # sketches: age of the oldest batch not yet in them


@dataclass(frozen=True)
class SketchOptions:
    """How sketch answers are made: the service's KLL k and fold budget, and how long a caller waits."""

    k: int = sketches.DEFAULT_K
    fold_values: int = 1 << 24
    wait_for_s: float | None = None  # None: answer from the sketches as they are


def exact_boundaries(
    conn: psycopg.Connection, layer: Layer, where: ActivationFilter, n_quantiles: int, memory_bytes: int
) -> tuple[np.ndarray, int]:
    """Exact boundaries over the stored rows, reading as many units per pass as memory allows."""
    conditions, params = where.where(run_id=layer.run_id)
    partition = layer_partition(layer.run_id, layer.id)
    if where == ActivationFilter():  # every row: the ledger knows how many, no scan needed
        n_rows = one_row(
            conn.execute(
                "SELECT coalesce(sum(row_count), 0) FROM ingest_batches WHERE run_id = %s AND layer_id = %s",
                (layer.run_id, layer.id),
            )
        )[0]
    else:
        n_rows = one_row(
            conn.execute(sql.SQL("SELECT count(*) FROM {} a WHERE {}").format(partition, conditions), params)
        )[0]
    if n_rows == 0:
        raise InvalidInput("no stored rows match; nothing to compute quantiles of", field="filter")
    bytes_per_unit = n_rows * 4 * 2  # the column block and numpy's working copy
    units_per_pass = min(layer.dim, memory_bytes // bytes_per_unit)
    if units_per_pass < 1:
        raise PayloadTooLarge(
            f"{n_rows} rows exceed the memory budget for exact quantiles of even one unit; use method=sketch",
            field="method",
        )
    boundaries = np.empty((layer.dim, n_quantiles - 1), dtype=np.float32)
    for start in range(0, layer.dim, units_per_pass):
        width = min(units_per_pass, layer.dim - start)
        column = (
            sql.SQL("a.values")
            if width == layer.dim
            else sql.SQL("subvector(a.values, {}, {})").format(sql.Literal(start + 1), sql.Literal(width))
        )
        select = sql.SQL("SELECT {} FROM {} a WHERE {}").format(column, partition, conditions)
        block = np.empty((n_rows, width), dtype=np.float32)
        filled = 0
        for chunk in iter_vectors(conn, select, params, width):
            block[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        if filled != n_rows:  # impossible inside one snapshot; refuse rather than answer wrongly
            raise RuntimeError(f"read {filled} rows where the snapshot counted {n_rows}")
        boundaries[start : start + width] = exact_boundaries_of(block, n_quantiles)
    return boundaries, n_rows


def compute(
    conn: psycopg.Connection,
    layer: Layer,
    n_quantiles: int,
    method: str,
    where: ActivationFilter,
    memory_bytes: int,
    scan_timeout_ms: int | None = None,
    sketch: SketchOptions = SketchOptions(),
) -> QuantileSet:
    """Computes and stores a new version of the layer's quantile set.

    A sketch answer covers the rows folded into the sketches when it was made and says how
    far behind it was; with `sketch.wait_for_s` it first folds in (or waits for) every batch
    committed before the call.
    """
    if not 2 <= n_quantiles <= 1024:
        raise InvalidInput("n_quantiles is between 2 and 1024", field="n_quantiles")
    if method not in METHODS:
        raise InvalidInput(f"method is one of {METHODS}", field="method")
    rank_error, behind = None, None
    if method == "sketch":
        _check_sketch_request(layer, where)
        if sketch.wait_for_s is not None:
            sketches.catch_up(conn, layer, sketch.k, sketch.fold_values, sketch.wait_for_s)
    with conn.transaction():
        # one snapshot for the count and the read, so rows used and boundaries agree
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        if scan_timeout_ms is not None:  # a full scan of a large layer may outlast the per-request timeout
            conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(int(scan_timeout_ms))))
        if method == "exact":
            boundaries, n_rows = exact_boundaries(conn, layer, where, n_quantiles, memory_bytes)
        else:
            behind = sketches.backlog(conn, layer)  # in the same snapshot as the sketches read next
            boundaries, n_rows, rank_error = _sketch(conn, layer, where, n_quantiles, behind)
    return _store(conn, layer, n_quantiles, method, where, n_rows, boundaries, rank_error, behind)


def _check_sketch_request(layer: Layer, where: ActivationFilter) -> None:
    if not layer.sketch:
        raise InvalidInput(f"layer {layer.name!r} keeps no sketches (created with sketch=false)", field="method")
    unsupported = [name for name, value in _filter_json(where).items() if name != "task" and value is not None]
    if unsupported:
        raise InvalidInput(
            f"sketches are kept per task; filter by {unsupported[0]} needs method=exact", field=unsupported[0]
        )


def _sketch(
    conn, layer: Layer, where: ActivationFilter, n_quantiles: int, behind: sketches.Backlog
) -> tuple[np.ndarray, int, float]:
    merged, k = sketches.merged_sketches(conn, layer, where.task)
    if not merged or merged[0].n == 0:
        if behind.rows:
            raise Unavailable(
                f"no rows are in the sketches yet: {behind.rows} rows ({behind.batches} batches) wait to be "
                "folded in; pass wait_for (seconds) for an up-to-date answer",
                field="wait_for",
                code="sketches_behind",
            )
        raise InvalidInput("no stored rows match; nothing to compute quantiles of", field="filter")
    return sketches.sketch_boundaries(merged, n_quantiles), int(merged[0].n), sketches.rank_error_bound(k)


def _filter_json(where: ActivationFilter) -> dict:
    described = asdict(where)
    described["sample_ids"] = list(described["sample_ids"]) or None
    return {name: value for name, value in described.items() if value is not None}


_SET_COLUMNS = (
    "id, run_id, layer_id, version, n_quantiles, method, filter, rows_used, units, boundaries, rank_error, created_at, "
    "pending_rows, lag_s"
)


def _store(conn, layer, n_quantiles, method, where, n_rows, boundaries, rank_error, behind) -> QuantileSet:
    with conn.transaction():
        conn.execute(  # versions in order
            "SELECT 1 FROM layers WHERE run_id = %s AND id = %s FOR UPDATE", (layer.run_id, layer.id)
        )
        row = conn.execute(
            f"INSERT INTO quantile_sets (run_id, layer_id, version, n_quantiles, method, filter, rows_used, units, "
            f"boundaries, rank_error, pending_rows, lag_s) "
            f"SELECT %s, %s, coalesce(max(version), 0) + 1, %s, %s, %s, %s, %s, %s, %s, %s, %s "
            f"FROM quantile_sets WHERE run_id = %s AND layer_id = %s RETURNING {_SET_COLUMNS}",
            (
                layer.run_id,
                layer.id,
                n_quantiles,
                method,
                json.dumps(_filter_json(where)),
                n_rows,
                layer.dim,
                boundaries.astype(np.float32).tobytes(),
                rank_error,
                None if behind is None else behind.rows,
                None if behind is None else behind.lag_s,
                layer.run_id,
                layer.id,
            ),
        ).fetchone()
    return _from_row(row)


def _from_row(row: tuple) -> QuantileSet:
    (id_, run_id, layer_id, version, n_quantiles, method, filter_, rows, units, blob, rank_error, created_at) = row[:12]
    boundaries = np.frombuffer(bytes(blob), dtype=np.float32).reshape(units, n_quantiles - 1)
    pending_rows, lag_s = row[12:]
    return QuantileSet(
        id_,
        run_id,
        layer_id,
        version,
        n_quantiles,
        method,
        filter_,
        rows,
        boundaries,
        rank_error,
        created_at,
        None if pending_rows is None else int(pending_rows),
        lag_s,
    )


def latest(conn: psycopg.Connection, layer: Layer, method: str | None = None) -> QuantileSet:
    row = conn.execute(
        f"SELECT {_SET_COLUMNS} FROM quantile_sets WHERE run_id = %s AND layer_id = %s "
        f"AND (%s::text IS NULL OR method = %s) ORDER BY version DESC LIMIT 1",
        (layer.run_id, layer.id, method, method),
    ).fetchone()
    if row is None:
        raise NotFound(f"layer {layer.id} has no quantile set yet", field="layer_id")
    return _from_row(row)


@dataclass(frozen=True)
class QuantileSetInfo:
    """A quantile set without its boundaries: what a list shows."""

    id: int
    version: int
    method: str
    n_quantiles: int
    filter: dict
    rows: int
    rank_error: float | None
    created_at: datetime


def list_sets(conn: psycopg.Connection, layer: Layer, limit: int) -> list[QuantileSetInfo]:
    """The layer's quantile sets, newest version first (boundaries left out: GET a set for them)."""
    cursor = conn.cursor(row_factory=class_row(QuantileSetInfo))
    return cursor.execute(
        "SELECT id, version, method, n_quantiles, filter, rows_used AS rows, rank_error, created_at "
        "FROM quantile_sets WHERE run_id = %s AND layer_id = %s ORDER BY version DESC LIMIT %s",
        (layer.run_id, layer.id, limit),
    ).fetchall()


def get(conn: psycopg.Connection, project_id: int, set_id: int) -> QuantileSet:
    """A quantile set of the caller's project (another project's is not found)."""
    row = conn.execute(
        f"SELECT {', '.join('q.' + c.strip() for c in _SET_COLUMNS.split(','))} FROM quantile_sets q "
        f"JOIN runs r ON r.id = q.run_id WHERE q.id = %s AND r.project_id = %s",
        (set_id, project_id),
    ).fetchone()
    if row is None:
        raise NotFound(f"quantile set {set_id} not found", field="set_id")
    return _from_row(row)


def bucketize(boundaries: np.ndarray, values: np.ndarray, block_elements: int = 1 << 24) -> np.ndarray:
    """Bucket of each value of each unit: the number of the unit's boundaries strictly below it.

    Vectorised as a comparison against all boundaries at once, in row blocks that keep
    the boolean temporary under `block_elements`.
    """
    units, per_unit = boundaries.shape
    if values.ndim != 2 or values.shape[1] != units:
        raise InvalidInput(f"values must be rows of {units} units", field="values")
    buckets = np.empty(values.shape, dtype=np.int32)
    step = max(1, block_elements // max(1, units * per_unit))
    for start in range(0, len(values), step):
        block = values[start : start + step]
        buckets[start : start + step] = (block[:, :, None] > boundaries[None, :, :]).sum(axis=2)
    return buckets
