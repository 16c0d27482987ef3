"""Kernel records: per task and layer of a run, each kernel's weight change and importance.

A record set is one (task, layer) of a run: one change and one importance per kernel, in
kernel order, and the number of intervals the change is the mean of. Writing a set again
replaces it whole, so a resumed task that records once more leaves one copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import class_row

from app import runs
from eidetic.errors import DimensionMismatch, InvalidInput, NonFiniteValue, NotFound

RankedBy = Literal["change", "importance"]
_RANKED_COLUMNS: dict[str, sql.Identifier] = {
    "change": sql.Identifier("change"),
    "importance": sql.Identifier("importance"),
}


@dataclass(frozen=True)
class KernelRecordSet:
    """One (task, layer) of a run: values in kernel order (kernel i at index i)."""

    task: int
    layer: str
    intervals: int
    change: list[float]
    importance: list[float]
    recorded_at: datetime


@dataclass(frozen=True)
class TopKernels:
    """The k kernels of a layer with the largest value for one task, largest first (ties: lower index)."""

    task: int
    layer: str
    by: str
    n_kernels: int
    kernels: list[int]
    values: list[float]


def top_count(n_kernels: int, k: int | None, ratio: float | None) -> int:
    """How many kernels a top query returns: `k` (at most all), or ceil(ratio x n) and at least one."""
    if (k is None) == (ratio is None):
        raise InvalidInput("give exactly one of k (a count) and ratio (a share of the layer's kernels)", field="k")
    if k is not None:
        return min(k, n_kernels)
    assert ratio is not None
    # The same rounding as the client's neuromodulation, so both agree on which kernels are "top".
    return max(1, min(n_kernels, math.ceil(ratio * n_kernels - 1e-9)))


def _finite(values: list[float], field: str) -> None:
    finite = np.isfinite(np.asarray(values, dtype=np.float64))
    if not finite.all():
        bad = int(np.argmin(finite))
        raise NonFiniteValue(f"kernel {bad} holds NaN or Inf", field=f"{field}[{bad}]")


def write(
    conn: psycopg.Connection,
    project_id: int,
    run_id: int,
    *,
    task: int,
    layer: str,
    change: list[float],
    importance: list[float],
    intervals: int,
) -> KernelRecordSet:
    """Stores (or replaces) the record set of one task and layer, all kernels at once."""
    if len(change) != len(importance):
        raise DimensionMismatch(
            f"one value per kernel in both: {len(change)} changes, {len(importance)} importances", field="importance"
        )
    _finite(change, "change")
    _finite(importance, "importance")
    with conn.transaction():
        runs.get_run(conn, project_id, run_id, lock=True)
        conn.execute("DELETE FROM kernel_records WHERE run_id = %s AND task = %s AND layer = %s", (run_id, task, layer))
        conn.execute(
            "INSERT INTO kernel_records (run_id, task, layer, kernel, change, importance, intervals) "
            "SELECT %s, %s, %s, ordinal - 1, change, importance, %s "
            "FROM unnest(%s::float8[], %s::float8[]) WITH ORDINALITY AS given (change, importance, ordinal)",
            (run_id, task, layer, intervals, change, importance),
        )
    found = read(conn, project_id, run_id, task=task, layer=layer)
    return found[0]


def read(
    conn: psycopg.Connection, project_id: int, run_id: int, *, task: int | None = None, layer: str | None = None
) -> list[KernelRecordSet]:
    """The run's record sets, ordered by task then layer; filtered to one task and/or layer if given."""
    runs.get_run(conn, project_id, run_id)
    with conn.cursor(row_factory=class_row(KernelRecordSet)) as cursor:
        return cursor.execute(
            "SELECT task, layer, min(intervals) AS intervals, "
            "array_agg(change ORDER BY kernel) AS change, array_agg(importance ORDER BY kernel) AS importance, "
            "max(recorded_at) AS recorded_at "
            "FROM kernel_records WHERE run_id = %(run)s "
            "AND (%(task)s::integer IS NULL OR task = %(task)s) AND (%(layer)s::text IS NULL OR layer = %(layer)s) "
            "GROUP BY task, layer ORDER BY task, layer",
            {"run": run_id, "task": task, "layer": layer},
        ).fetchall()


def top(
    conn: psycopg.Connection,
    project_id: int,
    run_id: int,
    *,
    task: int,
    layer: str,
    by: RankedBy,
    k: int | None = None,
    ratio: float | None = None,
) -> TopKernels:
    """The top kernels of a layer for a task, by change or importance; 404 when that set was never recorded."""
    runs.get_run(conn, project_id, run_id)
    n_kernels = conn.execute(
        "SELECT count(*) FROM kernel_records WHERE run_id = %s AND task = %s AND layer = %s", (run_id, task, layer)
    ).fetchone()
    if n_kernels is None or n_kernels[0] == 0:
        raise NotFound(f"run {run_id} has no kernel records of layer {layer!r} for task {task}", field="layer")
    count = top_count(int(n_kernels[0]), k, ratio)
    rows = conn.execute(
        sql.SQL(
            "SELECT kernel, {column} FROM kernel_records WHERE run_id = %s AND task = %s AND layer = %s "
            "ORDER BY {column} DESC, kernel LIMIT %s"
        ).format(column=_RANKED_COLUMNS[by]),
        (run_id, task, layer, count),
    ).fetchall()
    return TopKernels(
        task=task,
        layer=layer,
        by=by,
        n_kernels=int(n_kernels[0]),
        kernels=[int(row[0]) for row in rows],
        values=[float(row[1]) for row in rows],
    )
