"""Aggregates a person watching a run reads: computed in the database, so only summaries travel.

Per-step percentile bands and histograms of one unit of a layer, what each run of a project
holds (rows, bytes, recent ingest), and a bank's items, neighbours and 2-D projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import class_row, dict_row

from app import banks
from app.query import ActivationFilter
from app.runs import Layer
from app.sampling import SEED, Sample, rows_of
from eidetic.errors import InvalidInput, NotFound

# TensorBoard's distribution bands: min, -2σ, -1.5σ, -1σ, median, +1σ, +1.5σ, +2σ, max of a normal.
BAND_PERCENTILES = (0.0, 6.68, 15.87, 30.85, 50.0, 69.15, 84.13, 93.32, 100.0)
PROJECTION_OVERSAMPLE = 2.0  # a large bank's projection reads about this many times the sample's share of pages


@dataclass(frozen=True)
class StepBucket:
    step_min: int
    step_max: int
    rows: int
    values: list[float]  # one per BAND_PERCENTILES


@dataclass(frozen=True)
class Histogram:
    rows: int  # rows counted: those of the sample, when one was read
    edges: list[float]
    counts: list[int]


@dataclass(frozen=True)
class RunStats:
    run_id: int
    name: str
    status: str
    layers: int
    rows: int
    bytes: int
    last_ingest_at: datetime | None
    rows_last_minute: int


def _unit_column(layer: Layer, unit: int) -> sql.Composable:
    """One unit of the vector as a real (pgvector has no subscript: 1-based, through a one-element
    subvector, which is about 4x cheaper than casting the whole vector to real[] on 128 units)."""
    if unit >= layer.dim:
        raise InvalidInput(f"unit {unit} is past the layer's {layer.dim} units (0-based)", field="unit")
    return sql.SQL("(subvector(a.values, {}, 1)::real[])[1]").format(sql.Literal(unit + 1))


def distribution(
    conn: psycopg.Connection, layer: Layer, unit: int, buckets: int, where: ActivationFilter, sample: Sample
) -> list[StepBucket]:
    """Percentile bands of one unit over equal-width step buckets (rows without a step are left out)."""
    conditions, params = where.where(run_id=layer.run_id)
    statement = sql.SQL(
        "WITH picked AS (SELECT a.step, {unit} AS v FROM {rows} WHERE a.step IS NOT NULL AND {where}), "
        "span AS (SELECT min(step) AS lo, max(step) AS hi FROM picked) "
        "SELECT least(floor((p.step - s.lo)::numeric * %s / (s.hi - s.lo + 1)), %s - 1)::int AS bucket, "
        "min(p.step) AS step_min, max(p.step) AS step_max, count(*) AS rows, "
        "percentile_cont(%s::float8[]) WITHIN GROUP (ORDER BY p.v) AS values "
        "FROM picked p CROSS JOIN span s GROUP BY 1 ORDER BY 1"
    ).format(unit=_unit_column(layer, unit), rows=rows_of(layer, sample), where=conditions)
    fractions = [p / 100 for p in BAND_PERCENTILES]
    rows = conn.execute(statement, [*params, buckets, buckets, fractions]).fetchall()
    return [StepBucket(step_min=r[1], step_max=r[2], rows=r[3], values=[float(v) for v in r[4]]) for r in rows]


def histogram(
    conn: psycopg.Connection, layer: Layer, unit: int, bins: int, where: ActivationFilter, sample: Sample
) -> Histogram:
    """Counts of one unit's values in equal-width bins spanning its range over the selected rows."""
    conditions, params = where.where(run_id=layer.run_id)
    statement = sql.SQL(
        "WITH picked AS (SELECT {unit}::float8 AS v FROM {rows} WHERE {where}), "
        "span AS (SELECT min(v) AS lo, max(v) AS hi FROM picked) "
        "SELECT s.lo, s.hi, CASE WHEN s.hi > s.lo THEN least(width_bucket(p.v, s.lo, s.hi, %s), %s) ELSE 1 END, "
        "count(*) FROM picked p CROSS JOIN span s GROUP BY 1, 2, 3 ORDER BY 3"
    ).format(unit=_unit_column(layer, unit), rows=rows_of(layer, sample), where=conditions)
    found = conn.execute(statement, [*params, bins, bins]).fetchall()
    if not found:
        return Histogram(rows=0, edges=[], counts=[])
    low, high = float(found[0][0]), float(found[0][1])
    if high <= low:  # one value: a bin of width one around it
        low, high = low - 0.5, high + 0.5
    counts = np.zeros(bins, dtype=np.int64)
    for _, _, bucket, count in found:
        counts[bucket - 1] = count
    return Histogram(rows=int(counts.sum()), edges=np.linspace(low, high, bins + 1).tolist(), counts=counts.tolist())


def run_stats(conn: psycopg.Connection, project_id: int) -> list[RunStats]:
    """Every run of the project: layers, rows stored (from the ingest ledger), bytes on disk, recent ingest."""
    cursor = conn.cursor(row_factory=class_row(RunStats))
    return cursor.execute(
        "SELECT r.id AS run_id, r.name, r.status, "
        "(SELECT count(*) FROM layers l WHERE l.run_id = r.id)::int AS layers, "
        "coalesce(sum(b.row_count), 0)::bigint AS rows, "
        "(SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0) "
        " FROM pg_partition_tree(to_regclass(format('activations_r%%s', r.id))) t)::bigint AS bytes, "
        "max(b.created_at) AS last_ingest_at, "
        "coalesce(sum(b.row_count) FILTER (WHERE b.created_at > now() - interval '60 seconds'), 0)::bigint "
        "AS rows_last_minute "
        "FROM runs r LEFT JOIN ingest_batches b ON b.run_id = r.id WHERE r.project_id = %s "
        "GROUP BY r.id ORDER BY r.id",
        (project_id,),
    ).fetchall()


@dataclass(frozen=True)
class BankItem:
    id: int
    label: int | None
    confidence: float | None
    version: int
    hits: int


@dataclass(frozen=True)
class LabelCount:
    label: int | None
    items: int


def bank_items(
    conn: psycopg.Connection, bank: banks.Bank, label: int | None, after_id: int, limit: int
) -> tuple[list[BankItem], list[LabelCount]]:
    """A page of the bank's items in id order (of one label, if given) with their hits, and items per label."""
    partition = banks.items_partition(bank.id)
    label_filter = sql.SQL("AND i.label = %s") if label is not None else sql.SQL("")
    cursor = conn.cursor(row_factory=class_row(BankItem))
    items = cursor.execute(
        sql.SQL(
            "SELECT i.id, i.label, i.confidence, i.version, coalesce(h.hits, 0) AS hits FROM {} i "
            "LEFT JOIN memory_hits h ON h.bank_id = %s AND h.item_id = i.id "
            "WHERE i.id > %s {} ORDER BY i.id LIMIT %s"
        ).format(partition, label_filter),
        [bank.id, after_id, *([label] if label is not None else []), limit],
    ).fetchall()
    counts = conn.cursor(row_factory=class_row(LabelCount))
    labels = counts.execute(
        sql.SQL("SELECT label, count(*) AS items FROM {} GROUP BY label ORDER BY label NULLS LAST").format(partition)
    ).fetchall()
    return items, labels


def item_neighbours(conn: psycopg.Connection, bank: banks.Bank, item_id: int, k: int) -> banks.Neighbours:
    """The k items nearest to a stored item (itself left out), by an exact scan; counts no hits."""
    row = conn.execute(
        sql.SQL("SELECT key::real[] FROM {} WHERE id = %s").format(banks.items_partition(bank.id)), (item_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"item {item_id} not found in bank {bank.id}", field="item_id")
    key = np.asarray(row[0], dtype=np.float32)[None, :]
    found = banks.search(conn, bank, key, k + 1, exact=True, ef_search=100, labels=None)[0]
    keep = [i for i, found_id in enumerate(found.ids) if found_id != item_id][:k]
    return banks.Neighbours(
        ids=[found.ids[i] for i in keep],
        scores=[found.scores[i] for i in keep],
        labels=[found.labels[i] for i in keep],
        prediction=found.prediction,
        confidence=found.confidence,
    )


@dataclass(frozen=True)
class Projection:
    ids: list[int]
    labels: list[int | None]
    x: list[float]
    y: list[float]
    explained_variance: list[float]  # of the two components, as fractions of the sample's variance
    size: int


def projection(conn: psycopg.Connection, bank: banks.Bank, sample: int) -> Projection:
    """The first two principal components of a sample of the keys (any bank size: only the sample is read).

    A bank much larger than the sample is read as a block sample (`TABLESAMPLE SYSTEM` of about
    twice the sample's share of its pages, a fixed seed) from which `sample` keys are drawn at
    random: a 100,000-key bank is about 60 MB, and scanning it whole to draw 5,000 keys took most
    of a second. The size comes from the bank's own count, not a scan. Keys travel in binary.
    """
    partition = banks.items_partition(bank.id)
    size = int(bank.size)
    wanted = min(sample, size)
    percent = 100.0 * PROJECTION_OVERSAMPLE * sample / size if size else 100.0
    statement = sql.SQL("SELECT id, label, key FROM {} {} ORDER BY random() LIMIT %s")
    cursor = conn.cursor(row_factory=dict_row, binary=True)
    rows: list[dict] = []
    if percent < 100.0:
        block = sql.SQL("TABLESAMPLE SYSTEM ({}) REPEATABLE ({})").format(
            sql.Literal(round(percent, 6)), sql.Literal(SEED)
        )
        rows = cursor.execute(statement.format(partition, block), (sample,)).fetchall()
    if len(rows) < wanted:  # a small bank, or a block sample that came up short: draw from every key
        rows = cursor.execute(statement.format(partition, sql.SQL("")), (sample,)).fetchall()
    rows.sort(key=lambda row: row["id"])
    if not rows:
        return Projection(ids=[], labels=[], x=[], y=[], explained_variance=[], size=0)
    keys = np.asarray([row["key"].to_numpy() for row in rows], dtype=np.float64)
    centred = keys - keys.mean(axis=0)
    # the eigenvectors of the dim x dim scatter matrix, not an SVD of the sample: the same axes, several
    # times faster for thousands of keys (an SVD of 5,000 x 128 took a quarter of a second)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(eigenvalues)[::-1]
    coordinates = centred @ eigenvectors[:, order[:2]]
    if coordinates.shape[1] < 2:  # a bank of one-dimensional keys: the second axis is flat
        coordinates = np.hstack([coordinates, np.zeros((len(coordinates), 1))])
    variance = np.clip(eigenvalues[order], 0.0, None)
    total = float(variance.sum())
    explained = [float(v / total) if total > 0 else 0.0 for v in variance[:2]]
    return Projection(
        ids=[row["id"] for row in rows],
        labels=[row["label"] for row in rows],
        x=coordinates[:, 0].tolist(),
        y=coordinates[:, 1].tolist(),
        explained_variance=explained,
        size=size,
    )


@dataclass(frozen=True)
class BankFill:
    version: int  # the bank's version now
    size: int
    capacity: int
    versions: list[int]  # the last change of each equal-width version bucket that had one, ascending
    sizes: list[int]  # the bank's size right after that change
    times: list[float]  # when that change committed (Unix seconds)


def bank_fill(conn: psycopg.Connection, bank: banks.Bank, points: int) -> BankFill:
    """The bank's size over time from its size history (`memory_bank_sizes`, a row per change), at most
    `points` of them: the last change of each equal-width version bucket, picked in the database."""
    latest = int(bank.version)
    found = conn.execute(
        "SELECT DISTINCT ON (b) version, size, extract(epoch FROM at)::float8 FROM ("
        " SELECT ceil(version * %(p)s::numeric / greatest(%(v)s, 1))::int AS b, version, size, at"
        " FROM memory_bank_sizes WHERE bank_id = %(bank)s"
        ") changes ORDER BY b, version DESC",
        {"p": min(points, max(latest, 1)), "v": latest, "bank": bank.id},
    ).fetchall()
    return BankFill(
        version=latest,
        size=bank.size,
        capacity=bank.capacity,
        versions=[int(v) for v, _, _ in found],
        sizes=[int(n) for _, n, _ in found],
        times=[float(t) for _, _, t in found],
    )
