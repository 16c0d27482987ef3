"""Per-unit KLL quantile sketches of a layer, one set per task, kept in step with ingest.

KLL (Apache DataSketches) is mergeable: a sketch per task is updated by each batch
inside the ingest transaction, and a query over several tasks merges them.
"""

from __future__ import annotations

import numpy as np
import psycopg
from datasketches import kll_floats_sketch

from app.database import one_row
from app.runs import Layer
from eidetic.wire.rows import ActivationRows

NO_TASK = ""
DEFAULT_K = 400  # rank error 0.68% at 99% confidence; about 10 KB per unit once full


def rank_error_bound(k: int) -> float:
    """KLL's normalized rank error of a single quantile at 99% confidence."""
    return float(kll_floats_sketch.get_normalized_rank_error(k, False))


def update_sketches(conn: psycopg.Connection, layer: Layer, rows: ActivationRows, k: int) -> None:
    """Adds the batch's values to the sketches of every task it holds (call inside the ingest transaction).

    Tasks are locked in sorted order, so two batches never wait on each other in a cycle.
    """
    codes = rows.task_codes
    by_task: dict[str, np.ndarray] = {}
    for code in np.unique(codes).tolist():
        name = NO_TASK if code < 0 else rows.task_names[code]
        by_task[name] = rows.values if len(by_task) == 0 and (codes == code).all() else rows.values[codes == code]
    batch_sketches = {task: sketch_columns(values, k) for task, values in by_task.items()}  # outside any lock
    for task in sorted(by_task):
        conn.execute(
            "INSERT INTO layer_sketches (run_id, layer_id, task, k, n, sketches) VALUES (%s, %s, %s, %s, 0, '{}') "
            "ON CONFLICT DO NOTHING",
            (layer.run_id, layer.id, task, k),
        )
        stored_k, blobs = one_row(
            conn.execute(  # binary: the sketches travel as bytes, not escaped text
                "SELECT k, sketches FROM layer_sketches WHERE run_id = %s AND layer_id = %s AND task = %s FOR UPDATE",
                (layer.run_id, layer.id, task),
                binary=True,
            )
        )
        if blobs:  # merge the batch into what is stored; KLL merges keep the error guarantee
            sketches = _load(blobs, layer.dim, stored_k)
            for sketch, batch_sketch in zip(sketches, batch_sketches[task]):
                sketch.merge(batch_sketch)
        else:
            sketches = batch_sketches[task]
        conn.execute(
            "UPDATE layer_sketches SET n = %s, sketches = %b, updated_at = now() "
            "WHERE run_id = %s AND layer_id = %s AND task = %s",
            (sketches[0].n, [s.serialize() for s in sketches], layer.run_id, layer.id, task),
        )


def sketch_columns(values: np.ndarray, k: int) -> list[kll_floats_sketch]:
    """One KLL sketch per unit of a batch.

    Each unit's values go in sorted: KLL's error bound holds for a stream in any order, and
    sorted input makes its compactions (which sort their buffers) about twice as cheap, more
    than paying for numpy's sort, which also runs without the GIL.
    """
    columns = np.sort(np.asarray(values, dtype=np.float32).T, axis=1)  # a new C-ordered array (rows may be read-only)
    sketches = [kll_floats_sketch(k) for _ in range(len(columns))]
    for sketch, column in zip(sketches, columns):
        sketch.update(column)
    return sketches


def _load(blobs: list[bytes], dim: int, k: int) -> list[kll_floats_sketch]:
    if not blobs:
        return [kll_floats_sketch(k) for _ in range(dim)]
    return [kll_floats_sketch.deserialize(bytes(blob)) for blob in blobs]


def merged_sketches(conn: psycopg.Connection, layer: Layer, task: str | None) -> tuple[list[kll_floats_sketch], int]:
    """The layer's sketches for one task (None: every task merged) and their k."""
    if task is None:
        found = conn.execute(
            "SELECT k, sketches FROM layer_sketches WHERE run_id = %s AND layer_id = %s", (layer.run_id, layer.id)
        ).fetchall()
    else:
        found = conn.execute(
            "SELECT k, sketches FROM layer_sketches WHERE run_id = %s AND layer_id = %s AND task = %s",
            (layer.run_id, layer.id, task),
        ).fetchall()
    found = [(k, blobs) for k, blobs in found if blobs]
    if not found:
        return [], 0
    merged = _load(found[0][1], layer.dim, found[0][0])
    for k, blobs in found[1:]:
        for sketch, other in zip(merged, _load(blobs, layer.dim, k)):
            sketch.merge(other)
    return merged, min(k for k, _ in found)


def sketch_boundaries(sketches: list[kll_floats_sketch], n_quantiles: int) -> np.ndarray:
    """Boundary i of each unit: the smallest value whose inclusive rank reaches i/Q (inverted CDF)."""
    ranks = (np.arange(1, n_quantiles) / n_quantiles).tolist()
    return np.array([sketch.get_quantiles(ranks, inclusive=True) for sketch in sketches], dtype=np.float32)
