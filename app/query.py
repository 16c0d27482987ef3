"""Reading activations back: filtered keyset pages, streams in bounded memory, and per-unit summaries."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import psycopg
from psycopg import sql

from app.copy_binary import iter_vectors
from app.runs import Layer, layer_partition
from app.sampling import Sample, rows_of
from eidetic.errors import InvalidInput

ROW_FIELDS = ("batch_id", "row", "sample_id", "step", "epoch", "task", "label", "values")
MAX_SAMPLE_IDS = 10_000


@dataclass(frozen=True)
class ActivationFilter:
    """Which rows of a layer a query reads; every field is optional."""

    task: str | None = None
    label: int | None = None
    epoch: int | None = None
    step_min: int | None = None
    step_max: int | None = None
    sample_ids: tuple[int, ...] = field(default_factory=tuple)

    def where(self, alias: str = "a", run_id: int | None = None) -> tuple[sql.Composable, list]:
        """The WHERE conditions (bound parameters only) and their values.

        `run_id` names the run outright: one server prunes nothing more with it (a layer's
        partition holds one run), but Citus routes the statement to that run's shard alone.
        """
        column = lambda name: sql.Identifier(alias, name)  # noqa: E731
        conditions: list[sql.Composable] = [
            sql.SQL("TRUE") if run_id is None else sql.SQL("{} = {}").format(column("run_id"), sql.Literal(int(run_id)))
        ]
        params: list = []
        for name in ("task", "label", "epoch"):
            value = getattr(self, name)
            if value is not None:
                conditions.append(sql.SQL("{} = %s").format(column(name)))
                params.append(value)
        if self.step_min is not None:
            conditions.append(sql.SQL("{} >= %s").format(column("step")))
            params.append(self.step_min)
        if self.step_max is not None:
            conditions.append(sql.SQL("{} <= %s").format(column("step")))
            params.append(self.step_max)
        if self.sample_ids:
            conditions.append(sql.SQL("{} = ANY(%s)").format(column("sample_id")))
            params.append(list(self.sample_ids))
        return sql.SQL(" AND ").join(conditions), params

    def check(self) -> ActivationFilter:
        if self.step_min is not None and self.step_max is not None and self.step_min > self.step_max:
            raise InvalidInput("step_min is above step_max", field="step_min")
        if len(self.sample_ids) > MAX_SAMPLE_IDS:
            raise InvalidInput(f"at most {MAX_SAMPLE_IDS} sample ids per query", field="sample_id")
        return self


@dataclass(frozen=True, order=True)
class RowKey:
    """Where a row sits: its batch's ledger id and its place in the batch (the keyset cursor)."""

    batch_seq: int
    row_no: int

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"{self.batch_seq}:{self.row_no}".encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str) -> RowKey:
        try:
            padded = cursor + "=" * (-len(cursor) % 4)
            batch_seq, row_no = base64.urlsafe_b64decode(padded.encode()).decode().split(":")
            return cls(int(batch_seq), int(row_no))
        except (ValueError, binascii.Error, UnicodeDecodeError) as error:
            raise InvalidInput("the cursor is not one this service returned", field="cursor") from error


BEFORE_FIRST = RowKey(-1, -1)


def iter_row_windows(
    conn: psycopg.Connection,
    layer: Layer,
    where: ActivationFilter,
    after: RowKey = BEFORE_FIRST,
    limit: int | None = None,
    window_rows: int = 8192,
) -> Iterator[list[tuple]]:
    """Rows after `after` in key order, a window at a time, at most `limit` in all.

    Each row is a tuple of ROW_FIELDS followed by its batch_seq (for the cursor).

    Each window covers whole ingest batches found in the ledger, so the BRIN index on
    batch_seq finds them without a B-tree over every row; memory is bounded by a window.
    """
    conditions, params = where.where(run_id=layer.run_id)
    partition = layer_partition(layer.run_id, layer.id)
    statement = sql.SQL(
        "SELECT b.batch_id, a.row_no, a.sample_id, a.step, a.epoch, a.task, a.label, a.values, a.batch_seq "
        "FROM {} a JOIN ingest_batches b ON b.run_id = a.run_id AND b.id = a.batch_seq "
        "WHERE a.batch_seq BETWEEN %s AND %s AND (a.batch_seq, a.row_no) > (%s, %s) AND {} "
        "ORDER BY a.batch_seq, a.row_no LIMIT %s"
    ).format(partition, conditions)
    remaining = limit
    cursor = conn.cursor(binary=True)
    while remaining is None or remaining > 0:
        batches = conn.execute(
            "SELECT id, row_count FROM ingest_batches WHERE run_id = %s AND layer_id = %s AND id >= %s "
            "ORDER BY id LIMIT 1000",
            (layer.run_id, layer.id, max(after.batch_seq, 0)),
        ).fetchall()
        if not batches:
            return
        ids = np.array([b[0] for b in batches])
        covered = np.cumsum([b[1] for b in batches])
        last = ids[min(int(np.searchsorted(covered, window_rows)), len(ids) - 1)]
        take = window_rows if remaining is None else min(window_rows, remaining)
        window = cursor.execute(
            statement, (int(ids[0]), int(last), after.batch_seq, after.row_no, *params, take)
        ).fetchall()
        if window:
            yield [(*row[:7], _vector_array(row[7]), row[8]) for row in window]
            if remaining is not None:
                remaining -= len(window)
            if len(window) == take:  # the window may hold more: go on from the last row
                after = RowKey(int(window[-1][-1]), int(window[-1][1]))
                continue
        after = RowKey(int(last) + 1, -1)
        if window_rows < 1 << 20:
            window_rows *= 2  # sparse matches: widen the window instead of crawling


def _vector_array(value) -> np.ndarray:
    return value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value, dtype=np.float32)


def page(
    conn: psycopg.Connection, layer: Layer, where: ActivationFilter, after: RowKey, limit: int
) -> tuple[list[tuple], str | None]:
    """One page of rows and the cursor of the next page (None at the end)."""
    rows: list[tuple] = []
    for window in iter_row_windows(conn, layer, where, after, limit + 1):
        rows.extend(window)
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], RowKey(int(last[-1]), int(last[1])).encode()


@dataclass(frozen=True)
class LayerSummary:
    rows: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray


def summarize(
    conn: psycopg.Connection, layer: Layer, where: ActivationFilter, sample: Sample | None = None
) -> LayerSummary:
    """Per-unit count, mean, population std, min and max, streamed chunk by chunk (Chan's merge).

    Over every selected row, or over those of a block sample (`app.sampling`) when one is given.
    """
    conditions, params = where.where(run_id=layer.run_id)
    select = sql.SQL("SELECT a.values FROM {} WHERE {}").format(rows_of(layer, sample), conditions)
    count = 0
    mean = np.zeros(layer.dim)
    m2 = np.zeros(layer.dim)
    low = np.full(layer.dim, np.inf)
    high = np.full(layer.dim, -np.inf)
    for chunk in iter_vectors(conn, select, params, layer.dim):
        chunk = chunk.astype(np.float64)
        n = len(chunk)
        chunk_mean = chunk.mean(axis=0)
        chunk_m2 = ((chunk - chunk_mean) ** 2).sum(axis=0)
        delta = chunk_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + chunk_m2 + delta**2 * (count * n / total)
        count = total
        np.minimum(low, chunk.min(axis=0), out=low)
        np.maximum(high, chunk.max(axis=0), out=high)
    if count == 0:
        nan = np.full(layer.dim, np.nan)
        return LayerSummary(0, nan, nan, nan, nan)
    return LayerSummary(count, mean, np.sqrt(m2 / count), low, high)
