"""Per-unit KLL quantile sketches of a layer, one set per task, folded in off the ingest path.

KLL (Apache DataSketches) is mergeable: a query over several tasks merges the tasks'
sketches. Ingest only records a sketched layer's batch in the sketch ledger
(`sketch_backlog`, same transaction as its rows); `fold_layer` later reads pending batches
back, sketches them and merges them into `layer_sketches`, deleting their ledger rows in
that same transaction, so each batch is folded exactly once, whoever folds it and
whatever crashes. Building sketches costs more than the binary COPY of the rows
(bench/RESULTS.md), so keeping it in the ingest transaction halved ingest throughput.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import psycopg
from datasketches import kll_floats_sketch
from psycopg import sql
from psycopg_pool import ConnectionPool

from app.database import one_row
from app.runs import Layer, layer_partition
from app.settings import Settings
from eidetic.errors import Unavailable
from eidetic.wire.rows import ActivationRows

log = logging.getLogger(__name__)

NO_TASK = ""
DEFAULT_K = 400  # rank error 0.68% at 99% confidence; about 10 KB per unit once full
_CLAIM_BATCHES = 256  # ledger rows one fold looks at; it folds a prefix of them that fits its budget
_READ_VALUES = 1 << 26  # values one read of a fold packs into a bytea at most (256 MB; a bytea holds 1 GB)
_WAIT_POLL_S = 0.05  # how often a request waiting for an up-to-date answer looks again
_RETRY_S = 1.0  # the sketcher's pause after a failed fold (the database down, say)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rank_error_bound(k: int) -> float:
    """KLL's normalized rank error of a single quantile at 99% confidence."""
    return float(kll_floats_sketch.get_normalized_rank_error(k, False))


def record_batch(conn: psycopg.Connection, layer: Layer, batch_seq: int, rows: ActivationRows) -> None:
    """Puts a stored batch on the sketch ledger (call inside the ingest transaction): one small row, no sketching."""
    codes = np.unique(rows.task_codes).tolist()
    tasks = sorted({NO_TASK if code < 0 else rows.task_names[code] for code in codes})
    conn.execute(
        "INSERT INTO sketch_backlog (run_id, layer_id, batch_seq, row_count, tasks) VALUES (%s, %s, %s, %s, %s)",
        (layer.run_id, layer.id, batch_seq, rows.n_rows, tasks),
    )


def fold_layer(
    conn: psycopg.Connection, layer: Layer, k: int, max_values: int, *, lock_timeout_ms: int | None = None
) -> int:
    """Folds the layer's oldest pending batches into its sketches in one transaction; the rows folded.

    Claims ledger rows with SKIP LOCKED, so several sketchers (threads, service processes,
    requests that wait for an up-to-date answer) share the work and never fold a batch
    twice; the batches go in as long as their values stay within `max_values` (one at
    least). 0 when nothing is pending or every pending batch is being folded by another.
    With `lock_timeout_ms` a lock held by someone else (DDL on the partition, a VACUUM FULL,
    the run being deleted) raises `LockNotAvailable` after that long instead of queueing the
    fold, and everyone behind it, until the lock is released.
    """
    with conn.transaction():
        _set_lock_timeout(conn, lock_timeout_ms)
        _summarize_new_pages(conn, layer)
    with conn.transaction():
        _set_lock_timeout(conn, lock_timeout_ms)
        claimed = conn.execute(
            "SELECT batch_seq, row_count, tasks FROM sketch_backlog WHERE run_id = %s AND layer_id = %s "
            "ORDER BY batch_seq LIMIT %s FOR UPDATE SKIP LOCKED",
            (layer.run_id, layer.id, _CLAIM_BATCHES),
        ).fetchall()
        taken: list[tuple[int, list[str]]] = []
        rows = 0
        for batch_seq, row_count, tasks in claimed:
            if taken and (rows + row_count) * layer.dim > max_values:
                break
            taken.append((int(batch_seq), tasks))
            rows += int(row_count)
        if not taken:
            return 0
        seqs = [seq for seq, _ in taken]
        task_names = sorted({task for _, tasks in taken for task in tasks})
        # A fresh partition has no statistics and the planner scans all of it (in parallel);
        # the BRIN index, just summarized, reads only the batches' own pages, in one process.
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        codes, values = _read_batches(conn, layer, seqs, rows, task_names)
        if len(values) != rows:  # the ledger and the rows commit together; anything else is a broken store
            raise RuntimeError(f"layer {layer.id}: batches {seqs[0]}..{seqs[-1]} hold {len(values)} rows, not {rows}")
        present = np.unique(codes).tolist()
        if len(present) == 1:  # the usual case: no copy of the values by task
            by_task = {task_names[present[0] - 1]: values}
        else:
            by_task = {task_names[code - 1]: values[codes == code] for code in present}
        merge_into_layer(conn, layer, {task: sketch_columns(part, k) for task, part in by_task.items()}, k)
        conn.execute(
            "DELETE FROM sketch_backlog WHERE run_id = %s AND layer_id = %s AND batch_seq = ANY(%s)",
            (layer.run_id, layer.id, seqs),
        )
    return rows


def _summarize_new_pages(conn: psycopg.Connection, layer: Layer) -> None:
    """Brings the BRIN index of the layer's partition up to date before a fold reads its batches back.

    A BRIN scan reads every page written since the index was last summarized (by a vacuum),
    so during a long ingest each fold would read the whole partition again. Summarizing
    reads only the pages new since the last time, so the read that follows skips every
    earlier batch. Its own statement, so its lock (the one a vacuum takes) is held only
    while it runs; a role that does not own the partition skips it.
    """
    found = conn.execute(
        "SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = to_regclass(%s) AND am.amname = 'brin'",
        (layer_partition(layer.run_id, layer.id).as_string(conn),),
    ).fetchone()
    if found is not None:
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("SELECT brin_summarize_new_values(%s::regclass)", (found[0],))


def _set_lock_timeout(conn: psycopg.Connection, timeout_ms: int | None) -> None:
    if timeout_ms is not None:
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(int(timeout_ms))))


@dataclass(frozen=True)
class Backlog:
    """How far a layer's sketches are behind its committed rows."""

    batches: int
    rows: int
    lag_s: float  # age of the oldest batch not yet folded in; 0 when caught up
    last_seq: int | None


def backlog(conn: psycopg.Connection, layer: Layer) -> Backlog:
    batches, rows, lag_s, last_seq = one_row(
        conn.execute(
            "SELECT count(*), coalesce(sum(row_count), 0), "
            "coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8, max(batch_seq) "
            "FROM sketch_backlog WHERE run_id = %s AND layer_id = %s",
            (layer.run_id, layer.id),
        )
    )
    return Backlog(int(batches), int(rows), max(0.0, float(lag_s)), last_seq)


def catch_up(conn: psycopg.Connection, layer: Layer, k: int, max_values: int, wait_s: float) -> None:
    """Returns once every batch committed before the call is in the layer's sketches, folding them itself.

    Batches another sketcher holds are waited for; after `wait_s` seconds (checked between
    folds) the answer is a 503 that says how far behind the sketches still are.
    """
    target = backlog(conn, layer).last_seq
    if target is None:
        return
    deadline = time.monotonic() + wait_s
    while True:
        folded = fold_layer(conn, layer, k, max_values)
        batches, rows = one_row(
            conn.execute(
                "SELECT count(*), coalesce(sum(row_count), 0) FROM sketch_backlog "
                "WHERE run_id = %s AND layer_id = %s AND batch_seq <= %s",
                (layer.run_id, layer.id, target),
            )
        )
        if batches == 0:
            return
        if time.monotonic() >= deadline:
            raise Unavailable(
                f"the sketches of layer {layer.id} are still {rows} rows ({batches} batches) behind after "
                f"waiting {wait_s:g} s; wait longer, retry, or use method=exact",
                field="wait_for",
                code="sketches_behind",
            )
        if not folded:  # another sketcher holds them: let it finish
            time.sleep(_WAIT_POLL_S)


class Sketcher:
    """A background thread of the service that folds pending batches of every layer into their sketches.

    It folds a layer once no batch has arrived for `sketch_quiet_s`, or once its oldest
    pending batch is `sketch_max_lag_s` old: a burst of ingest runs without it, and a
    steady stream has its sketches at most about that far behind. It runs at the lowest
    CPU priority where the OS allows it per thread (Linux), so that on a busy machine
    ingest and queries go first.
    Every failure (the database down, a layer dropped mid-fold) is logged and retried
    later: its transaction rolled back, so nothing was half folded.
    """

    def __init__(self, pool: ConnectionPool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eidetic-sketcher", daemon=True)
        self._locked_until: dict[tuple[int, int], float] = {}  # layers whose partition was locked, until when

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # per-thread niceness is Linux's
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while not self._stop.is_set():
            try:
                folded = self.fold_some()
            except Exception:  # a background loop outlives any one failure
                log.warning("sketcher: a fold failed; retrying in %g s", _RETRY_S, exc_info=True)
                self._stop.wait(_RETRY_S)
                continue
            if not folded:
                self._stop.wait(self._settings.sketch_poll_s)

    def fold_some(self) -> int:
        """One pass over the layers with pending batches (oldest first); the rows folded."""
        folded = 0
        with self._pool.connection() as conn:
            pending = conn.execute(
                "SELECT b.run_id, b.layer_id, l.dim FROM sketch_backlog b "
                "JOIN layers l ON l.run_id = b.run_id AND l.id = b.layer_id "
                "GROUP BY b.run_id, b.layer_id, l.dim "
                "HAVING max(b.created_at) < now() - make_interval(secs => %s) "
                "OR min(b.created_at) < now() - make_interval(secs => %s) "
                "ORDER BY min(b.created_at) LIMIT 64",
                (self._settings.sketch_quiet_s, self._settings.sketch_max_lag_s),
            ).fetchall()
            now = time.monotonic()
            self._locked_until = {key: until for key, until in self._locked_until.items() if until > now}
            for run_id, layer_id, dim in pending:
                if self._stop.is_set():
                    break
                if (run_id, layer_id) in self._locked_until:
                    continue
                layer = Layer(id=layer_id, run_id=run_id, name="", dim=dim, kind="activations", created_at=_EPOCH)
                try:
                    folded += fold_layer(
                        conn,
                        layer,
                        self._settings.sketch_k,
                        self._settings.sketch_fold_values,
                        lock_timeout_ms=self._settings.sketch_lock_timeout_ms,
                    )
                except psycopg.errors.LockNotAvailable:  # someone holds the partition: leave it for a while
                    self._locked_until[(run_id, layer_id)] = time.monotonic() + _RETRY_S
        return folded


def _read_batches(
    conn: psycopg.Connection, layer: Layer, seqs: list[int], rows: int, task_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of some batches of a layer: each row's task as a 1-based code into `task_names`, and its values.

    The server packs them into two bytea values (`string_agg` of each row's binary form), so
    they come over as one message, where a COPY sends one per row and psycopg spends more
    time on those messages than the sketches take. A single batch too large for one bytea
    (1 GB) is read in windows of rows. The range on batch_seq lets the BRIN index skip
    what came before.
    """
    window = max(1, _READ_VALUES // layer.dim)
    select = sql.SQL(
        "SELECT string_agg(int4send(coalesce(array_position(%s::text[], coalesce(a.task, '')), 0)), ''::bytea), "
        "string_agg(vector_send(a.values), ''::bytea) FROM {} a "
        "WHERE a.run_id = %s AND a.batch_seq BETWEEN %s AND %s AND a.batch_seq = ANY(%s) AND a.row_no >= %s "
        "AND a.row_no < %s"
    ).format(layer_partition(layer.run_id, layer.id))
    vector = np.dtype([("dim", ">i2"), ("unused", ">i2"), ("values", ">f4", (layer.dim,))])
    codes, values = [], []
    for first_row in range(0, rows if len(seqs) == 1 else 1, window):
        last_row = first_row + window if len(seqs) == 1 else 2**31 - 1
        params = (task_names, layer.run_id, min(seqs), max(seqs), seqs, first_row, last_row)
        packed_codes, packed_vectors = one_row(conn.execute(select, params, binary=True))
        if packed_codes is None:
            continue
        codes.append(np.frombuffer(packed_codes, dtype=">i4").astype(np.int32))
        records = np.frombuffer(packed_vectors, dtype=vector)
        if (records["dim"] != layer.dim).any():
            raise RuntimeError(f"layer {layer.id}: a stored vector is not {layer.dim} wide")
        values.append(records["values"].astype(np.float32))
    if not values:
        return np.empty(0, dtype=np.int32), np.empty((0, layer.dim), dtype=np.float32)
    all_codes = np.concatenate(codes) if len(codes) > 1 else codes[0]
    if (all_codes == 0).any():
        raise RuntimeError(f"layer {layer.id}: a row's task is not among its batch's ledger tasks {task_names}")
    return all_codes, np.concatenate(values) if len(values) > 1 else values[0]


def merge_into_layer(
    conn: psycopg.Connection, layer: Layer, batch_sketches: dict[str, list[kll_floats_sketch]], k: int
) -> None:
    """Merges per-task sketches of new rows into the stored ones (inside the caller's transaction).

    Tasks are locked in sorted order, so two sketchers never wait on each other in a cycle.
    """
    for task in sorted(batch_sketches):
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
        if blobs:  # merge the new rows into what is stored; KLL merges keep the error guarantee
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
