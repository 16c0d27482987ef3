"""ActivationWriter: streams activations from a training loop to the store without stalling it.

The loop calls `write()` with a minibatch; a sender thread joins writes into batches of up
to `batch_rows` rows and delivers them through a transport (REST or direct). Delivery is
at-least-once from here and exactly-once in the store: every batch gets an id before its
first attempt and keeps it on every retry, and the store's ingest ledger acknowledges a
resent batch without copying it again. The queue is bounded: when the sender falls behind,
`write()` blocks (backpressure) instead of dropping rows or growing without limit.

An unreachable store is an outage, measured from the first failed attempt and ended by the
next acknowledgement. It is retried for `retry_budget_s` (minutes by default), not a number of
attempts: a service restart must not cost a training job its rows. Meanwhile batches wait in
memory up to `memory_backlog_bytes`, then in a spill directory on local disk (model/spill.py)
up to `spill_max_bytes`, so `write()` goes on returning; it blocks only when both are full.
When the store answers again, the waiting batches are delivered in the order they were cut,
under their own ids. Past the budget the writer stops with StoreUnavailable and saves what
it still holds in the spill, for `replay_spill` to deliver later.
A batch the store refuses for good (a 4xx) stops the writer; the typed error surfaces
on the next `write()`, `flush()` or `close()`.
"""

from __future__ import annotations

import atexit
import logging
import queue
import random
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from eidetic.client import EideticAPIError, EideticClient
from eidetic.config import MIB, ClientSettings, default_spill_dir
from eidetic.spill import SpillDirectory, SpilledBatch
from eidetic.transports import RestTransport, TransientError, Transport
from eidetic.wire.formats import load_lazy_imports
from eidetic.wire.rows import METADATA_COLUMNS, ActivationRows, concat_rows, slice_rows

__all__ = [
    "ActivationWriter",
    "BatchRejected",
    "StoreUnavailable",
    "WriterClosed",
    "WriterError",
    "WriterStats",
    "open_writer",
    "replay_spill",
]

log = logging.getLogger(__name__)

MAX_WRITER_ID_LENGTH = 100
_POLL_S = 0.05


# ---------------------------------------------------------------- errors


class WriterError(Exception):
    """The writer could not store some rows; raised on the caller's thread, never swallowed."""


class BatchRejected(WriterError, EideticAPIError):
    """The store refused a batch for good (e.g. dimension_mismatch): resending it cannot help."""

    def __init__(self, cause: EideticAPIError, batch_id: str, rows: int) -> None:
        EideticAPIError.__init__(self, cause.status, cause.code, cause.message, cause.field)
        self.args = (f"batch {batch_id!r} ({rows} rows) was rejected: {cause}",)
        self.batch_id = batch_id
        self.rows = rows


class StoreUnavailable(WriterError):
    """The store stayed unreachable past the retry budget (or a batch used up max_attempts).

    `spill_path` is where the rows the writer had not delivered are kept (None when spilling
    is off, and they are lost); `replay_spill(spill_path, transport)` delivers them later.
    """

    def __init__(
        self,
        batch_id: str,
        attempts: int,
        cause: BaseException,
        *,
        outage_s: float = 0.0,
        spill_path: Path | None = None,
    ) -> None:
        kept = (
            f"undelivered rows are kept in {spill_path} (deliver them with eidetic.writer.replay_spill)"
            if spill_path is not None
            else "spilling is off: undelivered rows are lost"
        )
        super().__init__(
            f"batch {batch_id!r} failed {attempts} times in an outage of {outage_s:.1f} s; last error: {cause}; {kept}"
        )
        self.batch_id = batch_id
        self.attempts = attempts
        self.outage_s = outage_s
        self.spill_path = spill_path


class WriterClosed(WriterError):
    """write() or flush() after close()."""


# ---------------------------------------------------------------- counters


@dataclass(frozen=True)
class WriterStats:
    """A snapshot of the writer's counters; rows_queued = rows_sent + rows_pending + rows_failed.

    rows_failed are rows this writer will not deliver; after a StoreUnavailable, rows_in_spill
    of them wait on disk for replay_spill. rows_spilled and batches_spilled count every batch
    that went to disk (delivered since or not); outage_seconds adds up the time the store was
    unreachable, the outage in progress included.
    """

    rows_queued: int = 0
    rows_sent: int = 0
    batches_sent: int = 0
    retries: int = 0
    duplicates: int = 0
    rows_failed: int = 0
    seconds_blocked: float = 0.0
    rows_spilled: int = 0
    batches_spilled: int = 0
    rows_in_spill: int = 0
    outage_seconds: float = 0.0

    @property
    def rows_pending(self) -> int:
        return self.rows_queued - self.rows_sent - self.rows_failed


@dataclass
class _Flush:
    """A marker in the queue: everything before it is sent before `done` is set."""

    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Batch:
    """A cut batch on its way to the store: its rows in memory, or its file in the spill."""

    seq: int
    batch_id: str
    n_rows: int
    rows: ActivationRows | None = None
    memory_bytes: int = 0
    spilled: SpilledBatch | None = None


_CLOSE = object()
_LINGER_EXPIRED = object()
_open_writers: weakref.WeakSet[ActivationWriter] = weakref.WeakSet()


# ---------------------------------------------------------------- the writer


class ActivationWriter:
    """Streams rows of one layer through `transport` from a background thread.

    A batch holds at most `batch_rows` rows and `max_batch_bytes` of values (so wide
    layers stay under the service's body limit). `queue_size` bounds the writes waiting
    for the sender; `linger_s` is how long a partial batch may wait for more rows before
    it is sent anyway.

    A batch that fails transiently is retried under the same id, after waits that double
    from `backoff_s` up to `max_backoff_s` (with jitter), until the store has been
    unreachable for `retry_budget_s` (or the batch has had `max_attempts`, if set). Cut
    batches wait for a lane in memory up to `memory_backlog_bytes`; during an outage the
    rest go to a directory of their own under `spill_dir`, up to `spill_max_bytes` (0 never
    spills). Only when neither has room does the sender stop taking writes, and `write()`
    blocks once the queue is full.

    `in_flight` batches may be on their way at once (the transport must allow that many
    concurrent `send` calls; both of ours do): while one batch is committing, the next is
    encoded and copied, which keeps the database busy between commits (bench/ingest.py).
    Batches may then commit out of order; each is still all-or-nothing and stored once.
    Lanes take batches in the order they were cut, spilled ones included, so with
    `in_flight=1` they commit strictly in order.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        batch_rows: int = 32768,
        max_batch_bytes: int = 32 * MIB,
        queue_size: int = 256,
        linger_s: float = 1.0,
        retry_budget_s: float = 600.0,
        max_attempts: int | None = None,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        memory_backlog_bytes: int = 64 * MIB,
        spill_dir: str | Path | None = None,
        spill_max_bytes: int = 4096 * MIB,
        writer_id: str | None = None,
        in_flight: int = 2,
    ) -> None:
        if min(batch_rows, max_batch_bytes, queue_size, in_flight) < 1:
            raise ValueError("batch_rows, max_batch_bytes, queue_size and in_flight must be at least 1")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts is at least 1 (or None: as many as the retry budget allows)")
        if retry_budget_s <= 0 or backoff_s <= 0 or max_backoff_s <= 0:
            raise ValueError("retry_budget_s, backoff_s and max_backoff_s must be positive")
        if memory_backlog_bytes < 0 or spill_max_bytes < 0:
            raise ValueError("memory_backlog_bytes and spill_max_bytes cannot be negative")
        self.writer_id = writer_id or uuid.uuid4().hex[:16]
        if len(self.writer_id) > MAX_WRITER_ID_LENGTH:
            raise ValueError(f"writer_id has at most {MAX_WRITER_ID_LENGTH} characters")
        self.batch_rows = batch_rows
        self.max_batch_bytes = max_batch_bytes
        self.linger_s = linger_s
        self.retry_budget_s = retry_budget_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.memory_backlog_bytes = memory_backlog_bytes
        self._spill = SpillDirectory(
            Path(spill_dir) if spill_dir else default_spill_dir(), self.writer_id, spill_max_bytes
        )
        self._transport = transport
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()  # guards the counters and the error
        self._admission = threading.Lock()  # orders puts against close(): nothing is queued after _CLOSE
        self._stats = WriterStats()
        self._error: WriterError | None = None
        self._error_surfaced = False
        self._closed = False
        self._dim: int | None = None
        self._seq = 0
        self._jitter = random.Random()
        self.in_flight = in_flight
        # The backlog: cut batches not yet taken by a lane, in the order they were cut. The same
        # condition wakes the sender (room, an outage), the lanes (work, a recovered store, a failure)
        # and flush (everything settled). Take it before self._lock when both are needed.
        self._backlog = threading.Condition()
        self._waiting: deque[_Batch] = deque()
        self._waiting_memory_bytes = 0
        self._idle_lanes = 0
        self._sending = 0  # batches taken by a lane and not yet settled
        self._stopping = False
        self._outage_since: float | None = None  # monotonic time of the first failure since the last acknowledgement
        self._recoveries = 0
        # Daemon threads of our own rather than a ThreadPoolExecutor: an executor refuses work once
        # the interpreter begins to exit, and a writer left open still delivers at exit (atexit).
        self._lanes = [
            threading.Thread(target=self._lane, name=f"eidetic-writer-{self.writer_id}-lane-{n}", daemon=True)
            for n in range(in_flight)
        ]
        self._thread = threading.Thread(target=self._run, name=f"eidetic-writer-{self.writer_id}", daemon=True)
        self._thread.start()
        for lane in self._lanes:
            lane.start()
        load_lazy_imports()  # nothing may be imported at exit, when a writer left open still sends
        _open_writers.add(self)

    # ------------------------------------------------------------ the training thread's side

    def write(
        self,
        values: Any,
        *,
        sample_id: Any = None,
        step: Any = None,
        epoch: Any = None,
        label: Any = None,
        task: str | Any = None,
    ) -> None:
        """Queues a (rows x dim) matrix with per-row or scalar metadata; blocks while the queue is full.

        The queue fills only when the sender cannot hand batches on: the store is slow and the
        memory backlog is full, or it is unreachable and the spill is full (or off).

        Accepts numpy arrays and torch tensors (detached and copied to the host here, so
        the caller may reuse or modify them at once).
        """
        if self._closed:
            raise WriterClosed("the writer is closed")
        self._raise_if_failed()
        rows = ActivationRows.build(
            _host_array(values, np.float32),
            sample_id=_host_metadata(sample_id),
            step=_host_metadata(step),
            epoch=_host_metadata(epoch),
            label=_host_metadata(label),
            task=task,
        )
        if rows.n_rows == 0:
            return
        if self._dim is None:
            self._dim = rows.dim
        elif rows.dim != self._dim:
            raise ValueError(f"this writer's rows have {self._dim} values each, these have {rows.dim}")
        self._count(rows_queued=rows.n_rows)
        try:
            self._enqueue(rows)
        except BaseException:
            self._count(rows_queued=-rows.n_rows)
            raise

    def flush(self, timeout: float | None = None) -> WriterStats:
        """Blocks until every row written before this call is acknowledged by the store.

        Spilled rows included: during an outage this waits until the store answers again or
        the retry budget runs out. Raises the writer's error if a batch failed, TimeoutError
        if `timeout` passes first.
        """
        if self._closed:
            self._raise_if_failed()
            return self.stats()
        self._raise_if_failed()
        marker = _Flush()
        self._enqueue(marker)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not marker.done.wait(_POLL_S):
            if not self._thread.is_alive():
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"flush did not finish within {timeout} s")
        self._raise_if_failed()
        return self.stats()

    def close(self, timeout: float | None = None) -> WriterStats:
        """Sends what is queued, stops the sender and closes the transport.

        During an outage it retries until the store answers or the retry budget runs out;
        then it raises StoreUnavailable naming the spill directory that holds the rows.
        Raises a failure that no earlier call has raised yet; closing twice is a no-op.
        """
        with self._admission:
            already = self._closed
            self._closed = True
            if not already:
                self._put_until_sender_exits(_CLOSE)
        if not already:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the writer did not finish sending within {timeout} s")
            with self._backlog:
                self._stopping = True
                self._backlog.notify_all()
            for lane in self._lanes:
                lane.join()
            self._transport.close()
            _open_writers.discard(self)
            stats = self.stats()
            if not self._spill.remove_if_empty():
                log.error(
                    "activation writer %s left %d rows in %s; deliver them with eidetic.writer.replay_spill",
                    self.writer_id,
                    stats.rows_in_spill,
                    self.spill_path,
                )
            if isinstance(self._error, StoreUnavailable) and stats.rows_failed > stats.rows_in_spill:
                log.error(
                    "activation writer %s lost %d rows: the spill was off, full or refused by the disk",
                    self.writer_id,
                    stats.rows_failed - stats.rows_in_spill,
                )
        with self._lock:
            error = None if self._error_surfaced else self._error
            self._error_surfaced = True
        if error is not None:
            raise error
        return self.stats()

    def stats(self) -> WriterStats:
        with self._lock:
            stats = self._stats
        since = self._outage_since
        if since is not None:
            stats = replace(stats, outage_seconds=stats.outage_seconds + time.monotonic() - since)
        return stats

    @property
    def error(self) -> WriterError | None:
        """The failure that stopped the writer, if any (without raising it)."""
        return self._error

    @property
    def spill_path(self) -> Path | None:
        """This writer's spill directory, once it has spilled a batch (None before)."""
        return self._spill.path() if self._spill.made else None

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception is already on its way: report ours in the log rather than mask it
            self.close()
        except WriterError as error:
            log.error("activation writer %s failed while closing: %s", self.writer_id, error)

    def _enqueue(self, item: object) -> None:
        """Puts with backpressure; gives up only if the writer failed meanwhile (then raises that)."""
        with self._admission:
            if self._closed:
                raise WriterClosed("the writer is closed")
            started = time.monotonic()
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                pass
            try:
                while True:
                    self._raise_if_failed()
                    try:
                        self._queue.put(item, timeout=_POLL_S)
                        return
                    except queue.Full:
                        if not self._thread.is_alive():
                            raise WriterError("the writer's sender thread has stopped") from None
            finally:
                self._count(seconds_blocked=time.monotonic() - started)

    def _put_until_sender_exits(self, item: object) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        with self._lock:
            error = self._error
            if error is not None:
                self._error_surfaced = True
        if error is not None:
            raise error

    def _count(self, **deltas: float) -> None:
        with self._lock:
            current = self._stats
            self._stats = WriterStats(
                **{name: getattr(current, name) + deltas.get(name, 0) for name in WriterStats.__dataclass_fields__}
            )

    # ------------------------------------------------------------ the sender thread's side

    def _run(self) -> None:
        pending: list[ActivationRows] = []
        pending_rows = 0
        deadline: float | None = None
        while True:
            item = self._next_item(deadline)
            if isinstance(item, ActivationRows):
                pending.append(item)
                pending_rows += item.n_rows
                if deadline is None:
                    deadline = time.monotonic() + self.linger_s
                if pending_rows >= self._rows_per_batch(item.dim):
                    pending, pending_rows = self._send(pending, whole=False)
                    deadline = None if not pending else deadline
                continue
            # The batch lingered long enough, someone flushes, or the writer closes: send it all.
            if pending:
                pending, pending_rows = self._send(pending, whole=True)
            deadline = None
            if isinstance(item, _Flush):
                self._wait_for_outstanding()
                item.done.set()
            elif item is _CLOSE:
                self._wait_for_outstanding()
                return

    def _next_item(self, deadline: float | None) -> object:
        try:
            if deadline is None:
                return self._queue.get()
            return self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return _LINGER_EXPIRED

    def _send(self, pending: list[ActivationRows], *, whole: bool) -> tuple[list[ActivationRows], int]:
        """Sends full batches (and, if `whole`, the remainder); returns what is left unsent."""
        joined = concat_rows(pending)
        limit = self._rows_per_batch(joined.dim)
        start = 0
        while joined.n_rows - start >= limit or (whole and start < joined.n_rows):
            stop = min(start + limit, joined.n_rows)
            self._dispatch(slice_rows(joined, start, stop))
            start = stop
        if start == joined.n_rows:
            return [], 0
        rest = slice_rows(joined, start, joined.n_rows)
        return [rest], rest.n_rows

    def _rows_per_batch(self, dim: int) -> int:
        return max(1, min(self.batch_rows, self.max_batch_bytes // (4 * dim)))

    def _dispatch(self, rows: ActivationRows) -> None:
        """Names one batch and puts it in the backlog: in memory, in the spill, or (once failed) abandons it.

        Blocks while the memory backlog is full and the batch may not be spilled: that is the
        backpressure that fills the queue and then holds write().
        """
        batch = _Batch(
            seq=self._seq,
            batch_id=f"{self.writer_id}-{self._seq}",
            n_rows=rows.n_rows,
            rows=rows,
            memory_bytes=_rows_nbytes(rows),
        )
        self._seq += 1
        while True:
            with self._backlog:
                while True:
                    if self._error is not None:
                        break
                    if self._fits_in_memory(batch):
                        self._append(batch)
                        return
                    if self._outage_since is not None and self._spill.has_room(batch.memory_bytes):
                        break
                    self._backlog.wait(_POLL_S)
            if self._error is not None:
                self._abandon(batch)
                return
            first = self.stats().batches_spilled == 0
            if self._spill_to_disk(batch):  # outside the lock: the lanes go on meanwhile
                if first and batch.spilled is not None:
                    log.warning(
                        "activation writer %s: the store is unreachable and the memory backlog is full; "
                        "spilling batches to %s",
                        self.writer_id,
                        batch.spilled.path.parent,
                    )
                with self._backlog:
                    self._append(batch)
                return
            # The disk refused it: spilling is off from now on, and the batch waits for memory.

    def _fits_in_memory(self, batch: _Batch) -> bool:
        """Room in the memory backlog, or a lane idle for it (so a batch larger than the backlog still goes)."""
        return self._waiting_memory_bytes + batch.memory_bytes <= self.memory_backlog_bytes or self._idle_lanes > len(
            self._waiting
        )

    def _append(self, batch: _Batch) -> None:
        """Under self._backlog: the batch joins the backlog behind every batch cut before it."""
        self._waiting.append(batch)
        self._waiting_memory_bytes += batch.memory_bytes
        self._backlog.notify_all()

    def _spill_to_disk(self, batch: _Batch) -> bool:
        """Moves the batch's rows to the spill; False (and spilling off) if the disk refuses."""
        if batch.rows is None:
            return True  # on disk already
        try:
            spilled = self._spill.save(batch.seq, batch.batch_id, batch.rows)
        except OSError as error:
            log.error(
                "activation writer %s cannot spill to %s (%s); write() blocks instead",
                self.writer_id,
                self._spill.parent,
                error,
            )
            self._spill.max_bytes = 0
            return False
        batch.spilled, batch.rows, batch.memory_bytes = spilled, None, 0
        self._count(rows_spilled=batch.n_rows, batches_spilled=1, rows_in_spill=batch.n_rows)
        return True

    def _lane(self) -> None:
        """Delivers batches from the backlog, oldest first, until close() finds it empty."""
        while True:
            with self._backlog:
                self._idle_lanes += 1
                self._backlog.notify_all()
                while not self._waiting and not self._stopping:
                    self._backlog.wait()
                self._idle_lanes -= 1
                if not self._waiting:
                    return
                batch = self._waiting.popleft()
                self._waiting_memory_bytes -= batch.memory_bytes
                self._sending += 1
            try:
                self._deliver(batch)
            finally:
                with self._backlog:
                    self._sending -= 1
                    self._backlog.notify_all()

    def _wait_for_outstanding(self) -> None:
        """Until every batch cut so far, spilled ones included, is acknowledged or has failed."""
        with self._backlog:
            while (self._waiting or self._sending) and any(lane.is_alive() for lane in self._lanes):
                self._backlog.wait(_POLL_S)

    def _deliver(self, batch: _Batch) -> None:
        """One batch, retried under its id until acknowledged, or until the writer stops."""
        if self._error is not None:
            return self._abandon(batch)
        rows, spilled = batch.rows, batch.spilled
        if rows is None:
            if spilled is None:
                raise RuntimeError(f"batch {batch.batch_id!r} has neither rows nor a spill file")
            try:
                rows = self._spill.load(spilled)
            except Exception as error:  # a damaged or vanished file: say which, never skip it silently
                failure = WriterError(
                    f"spilled batch {batch.batch_id!r} could not be read from {spilled.path}: {error!r}"
                )
                failure.__cause__ = error
                self._fail(failure)
                return self._abandon(batch)
        attempts = 0
        while True:
            try:
                receipt = self._transport.send(batch.batch_id, rows)
            except TransientError as error:
                attempts += 1
                if self._wait_to_retry(batch, attempts, error):
                    continue
                return self._abandon(batch)
            except EideticAPIError as error:
                self._fail(BatchRejected(error, batch.batch_id, batch.n_rows))
                return self._drop(batch)
            except Exception as error:  # a fault in the transport itself: surface it, never die silently
                failure = WriterError(f"batch {batch.batch_id!r}: the transport failed: {error!r}")
                failure.__cause__ = error
                self._fail(failure)
                return self._abandon(batch)
            self._store_answered()
            self._count(rows_sent=batch.n_rows, batches_sent=1, duplicates=int(receipt.duplicate))
            if batch.spilled is not None:
                self._spill.remove(batch.spilled)
                self._count(rows_in_spill=-batch.n_rows)
            return

    def _wait_to_retry(self, batch: _Batch, attempts: int, error: TransientError) -> bool:
        """Backs off before the next attempt; False once the outage outlasted the budget or the writer stopped."""
        now = time.monotonic()
        outage_s = now - self._store_failed(now)
        if self._error is not None:
            return False
        if outage_s >= self.retry_budget_s or (self.max_attempts is not None and attempts >= self.max_attempts):
            spill_path = self._spill_path_to_keep_rows()
            self._fail(StoreUnavailable(batch.batch_id, attempts, error, outage_s=outage_s, spill_path=spill_path))
            return False
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** min(attempts - 1, 62)) * self._jitter.uniform(0.5, 1.0)
        delay = min(delay, self.retry_budget_s - outage_s)  # the last attempt comes when the budget ends
        log.debug("batch %s: attempt %d failed (%s); retrying in %.2f s", batch.batch_id, attempts, error, delay)
        self._count(retries=1)
        with self._backlog:  # woken early when another lane got through (the store is back) or the writer failed
            recoveries = self._recoveries
            self._backlog.wait_for(lambda: self._error is not None or self._recoveries != recoveries, timeout=delay)
        return self._error is None

    def _spill_path_to_keep_rows(self) -> Path | None:
        """Where the rows go once the writer gives up (made now, so the error names a real place)."""
        if not (self._spill.enabled or self._spill.made):
            return None
        try:
            return self._spill.path()
        except OSError as error:
            log.error(
                "activation writer %s cannot make a spill directory under %s: %s",
                self.writer_id,
                self._spill.parent,
                error,
            )
            return None

    def _store_failed(self, now: float) -> float:
        """Notes a transient failure; returns when the outage began."""
        with self._backlog:
            if self._outage_since is None and self._error is None:
                self._outage_since = now
                log.warning(
                    "activation writer %s: the store is unreachable; retrying for up to %.3g s",
                    self.writer_id,
                    self.retry_budget_s,
                )
                self._backlog.notify_all()  # the sender may spill from now on
            return now if self._outage_since is None else self._outage_since

    def _store_answered(self) -> None:
        """An acknowledgement ends the outage (and its clock) and wakes lanes waiting to retry."""
        with self._backlog:
            if self._outage_since is None:
                return
            lasted = time.monotonic() - self._outage_since
            self._outage_since = None
            self._recoveries += 1
            self._count(outage_seconds=lasted)
            self._backlog.notify_all()
        log.warning("activation writer %s: the store answers again after %.1f s", self.writer_id, lasted)

    def _abandon(self, batch: _Batch) -> None:
        """The writer has stopped: the batch counts as failed, kept in the spill where that can be done.

        After a StoreUnavailable the rows still in memory are spilled too (to the spill's cap),
        so replay_spill can deliver all of them later; a spilled batch stays where it is.
        """
        saving = isinstance(self._error, StoreUnavailable) and self._spill.has_room(batch.memory_bytes)
        if batch.spilled is None and saving:
            self._spill_to_disk(batch)
        self._count(rows_failed=batch.n_rows)

    def _drop(self, batch: _Batch) -> None:
        """A batch the store refused for good: no resend can help, so its file goes too."""
        if batch.spilled is not None:
            self._spill.remove(batch.spilled)
            self._count(rows_in_spill=-batch.n_rows)
        self._count(rows_failed=batch.n_rows)

    def _fail(self, error: WriterError) -> None:
        log.error("activation writer %s stopped: %s", self.writer_id, error)
        with self._backlog:
            with self._lock:
                first = self._error is None
                if first:  # with batches in flight, the first failure is the one to report
                    self._error = error
            if first and self._outage_since is not None:  # the outage ends for this writer: freeze its clock
                self._count(outage_seconds=time.monotonic() - self._outage_since)
                self._outage_since = None
            self._backlog.notify_all()

    def _adopt(self, spill: SpillDirectory) -> None:
        """Takes over a spill another writer left (replay_spill): its batches join the backlog in order."""
        batches = spill.saved()
        self._spill = spill
        with self._backlog:
            for spilled in batches:
                self._append(_Batch(seq=spilled.seq, batch_id=spilled.batch_id, n_rows=spilled.n_rows, spilled=spilled))
        rows = sum(spilled.n_rows for spilled in batches)
        self._count(rows_queued=rows, rows_in_spill=rows)


def _rows_nbytes(rows: ActivationRows) -> int:
    """What a batch holds in memory (values, metadata, task codes)."""
    columns = (rows.column(name) for name in METADATA_COLUMNS)
    metadata = sum(column.data.nbytes + (column.nulls.nbytes if column.nulls is not None else 0) for column in columns)
    return rows.values.nbytes + metadata + rows.task_codes.nbytes


# ---------------------------------------------------------------- host copies of the caller's data


def _is_tensor(value: Any) -> bool:
    """A torch tensor, recognised without importing torch (workers without torch can still write numpy)."""
    return hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy")


def _host_array(value: Any, dtype: type | None) -> np.ndarray:
    """A private host copy: the caller may overwrite its buffer (or the device tensor) right away."""
    if _is_tensor(value):
        tensor = value.detach()
        if tensor.is_floating_point() and dtype is not None:
            tensor = tensor.float()  # bfloat16 and half have no numpy twin
        value = tensor.cpu().numpy()
    return np.array(value, dtype=dtype, copy=True)


def _host_metadata(value: Any) -> Any:
    if value is None or isinstance(value, (int, np.integer)):
        return value
    if _is_tensor(value) or isinstance(value, np.ndarray):
        array = _host_array(value, None)
        return array.item() if array.ndim == 0 else array
    return value


@atexit.register
def _close_open_writers() -> None:
    """A writer left open at exit still delivers what it holds (or says loudly that it could not)."""
    for writer in list(_open_writers):
        try:  # long enough for an outage to end or to be given up (and the rows spilled)
            writer.close(timeout=writer.retry_budget_s + 60)
        except (WriterError, TimeoutError) as error:
            log.error("activation writer %s lost rows at exit: %s", writer.writer_id, error)


# ---------------------------------------------------------------- the factory


def open_writer(
    run_id: int,
    layer_id: int,
    settings: ClientSettings | None = None,
    transport: Literal["rest", "direct"] | None = None,
    **writer_options: Any,
) -> ActivationWriter:
    """A writer for one layer, over the transport named here or in the settings (EIDETIC_TRANSPORT)."""
    settings = settings or ClientSettings()
    kind = transport or settings.eidetic_transport
    if kind == "rest":
        sender: Transport = RestTransport(EideticClient.from_settings(settings), run_id, layer_id)
    elif kind == "direct":
        if not settings.database_url:
            raise ValueError("the direct transport needs DATABASE_URL")
        from eidetic.direct import DirectTransport  # the service's code, loaded only when chosen

        sender = DirectTransport(settings.database_url, run_id, layer_id)
    else:
        raise ValueError(f"transport is 'rest' or 'direct', not {kind!r}")
    options: dict[str, Any] = {
        "batch_rows": settings.writer_batch_rows,
        "max_batch_bytes": settings.writer_max_batch_bytes,
        "queue_size": settings.writer_queue_size,
        "in_flight": settings.writer_in_flight,
        "retry_budget_s": settings.writer_retry_budget_s,
        "max_backoff_s": settings.writer_max_backoff_s,
        "max_attempts": settings.writer_max_attempts,
        "memory_backlog_bytes": settings.writer_memory_backlog_bytes,
        "spill_dir": settings.writer_spill_dir,
        "spill_max_bytes": settings.writer_spill_max_bytes,
    }
    options.update(writer_options)
    return ActivationWriter(sender, **options)


# ---------------------------------------------------------------- a spill left behind


def replay_spill(path: str | Path, transport: Transport, **writer_options: Any) -> WriterStats:
    """Delivers the batches a stopped writer left in `path` (StoreUnavailable names it).

    In the order they were cut and under their own batch ids, so a batch that did reach the
    store before is acknowledged as a duplicate and nothing is stored twice: replaying again
    is safe. Each file is removed once acknowledged, the directory once empty. Retries and
    failures are the writer's (`writer_options`); if the store is still unreachable past the
    budget, StoreUnavailable is raised and the remaining files stay where they are. Like
    close(), it closes `transport`.
    """
    writer = ActivationWriter(transport, **writer_options)
    try:
        writer._adopt(SpillDirectory.existing(Path(path), max_bytes=writer._spill.max_bytes))
    except BaseException:
        writer.close()
        raise
    return writer.close()
