"""ActivationWriter: streams activations from a training loop to the store without stalling it.

The loop calls `write()` with a minibatch; a sender thread joins writes into batches of up
to `batch_rows` rows and delivers them through a transport (REST or direct). Delivery is
at-least-once from here and exactly-once in the store: every batch gets an id before its
first attempt and keeps it on every retry, and the store's ingest ledger acknowledges a
resent batch without copying it again. The queue is bounded: when the sender falls behind,
`write()` blocks (backpressure) instead of dropping rows or growing without limit.
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
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from app.rows import ActivationRows
from app.rows import concat_rows, slice_rows
from model.client import EideticAPIError, EideticClient
from model.config import ClientSettings
from model.transports import DirectTransport, RestTransport, TransientError, Transport

log = logging.getLogger(__name__)

MAX_WRITER_ID_LENGTH = 100
MIB = 1024 * 1024
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
    """A batch still failed after every attempt; the store may be down or unreachable."""

    def __init__(self, batch_id: str, attempts: int, cause: BaseException) -> None:
        super().__init__(f"batch {batch_id!r} failed {attempts} times; last error: {cause}")
        self.batch_id = batch_id
        self.attempts = attempts


class WriterClosed(WriterError):
    """write() or flush() after close()."""


# ---------------------------------------------------------------- counters


@dataclass(frozen=True)
class WriterStats:
    """A snapshot of the writer's counters; rows_queued = rows_sent + rows_pending + rows_failed."""

    rows_queued: int = 0
    rows_sent: int = 0
    batches_sent: int = 0
    retries: int = 0
    duplicates: int = 0
    rows_failed: int = 0
    seconds_blocked: float = 0.0

    @property
    def rows_pending(self) -> int:
        return self.rows_queued - self.rows_sent - self.rows_failed


@dataclass
class _Flush:
    """A marker in the queue: everything before it is sent before `done` is set."""

    done: threading.Event = field(default_factory=threading.Event)


_CLOSE = object()
_LINGER_EXPIRED = object()
_open_writers: "weakref.WeakSet[ActivationWriter]" = weakref.WeakSet()


# ---------------------------------------------------------------- the writer


class ActivationWriter:
    """Streams rows of one layer through `transport` from a background thread.

    A batch holds at most `batch_rows` rows and `max_batch_bytes` of values (so wide
    layers stay under the service's body limit). `queue_size` bounds the writes waiting
    for the sender; `linger_s` is how long a partial batch may wait for more rows before
    it is sent anyway. Retries back off exponentially (with jitter) from `backoff_s` up
    to `max_backoff_s`, `max_attempts` times in all, always under the same batch id.

    `in_flight` batches may be on their way at once (the transport must allow that many
    concurrent `send` calls; both of ours do): while one batch is committing, the next is
    encoded and copied, which keeps the database busy between commits (bench/ingest.py).
    Batches may then commit out of order; each is still all-or-nothing and stored once.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        batch_rows: int = 32768,
        max_batch_bytes: int = 32 * MIB,
        queue_size: int = 256,
        linger_s: float = 1.0,
        max_attempts: int = 8,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        writer_id: str | None = None,
        in_flight: int = 2,
    ) -> None:
        if min(batch_rows, max_batch_bytes, queue_size, max_attempts, in_flight) < 1:
            raise ValueError("batch_rows, max_batch_bytes, queue_size, max_attempts and in_flight must be at least 1")
        self.writer_id = writer_id or uuid.uuid4().hex[:16]
        if len(self.writer_id) > MAX_WRITER_ID_LENGTH:
            raise ValueError(f"writer_id has at most {MAX_WRITER_ID_LENGTH} characters")
        self.batch_rows = batch_rows
        self.max_batch_bytes = max_batch_bytes
        self.linger_s = linger_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
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
        self._slots = threading.Semaphore(in_flight)
        self._outstanding: list[threading.Event] = []  # one per dispatched batch, set when it is settled
        # Daemon threads of our own rather than a ThreadPoolExecutor: an executor refuses work once
        # the interpreter begins to exit, and a writer left open still delivers at exit (atexit).
        self._lane_jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lanes = [
            threading.Thread(target=self._lane, name=f"eidetic-writer-{self.writer_id}-lane-{n}", daemon=True)
            for n in range(in_flight if in_flight > 1 else 0)
        ]
        self._thread = threading.Thread(target=self._run, name=f"eidetic-writer-{self.writer_id}", daemon=True)
        self._thread.start()
        for lane in self._lanes:
            lane.start()
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

        Raises the writer's error if a batch failed, TimeoutError if `timeout` passes first.
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
            for _ in self._lanes:
                self._lane_jobs.put(None)
            for lane in self._lanes:
                lane.join()
            self._transport.close()
            _open_writers.discard(self)
        with self._lock:
            error = None if self._error_surfaced else self._error
            self._error_surfaced = True
        if error is not None:
            raise error
        return self.stats()

    def stats(self) -> WriterStats:
        with self._lock:
            return self._stats

    @property
    def error(self) -> WriterError | None:
        """The failure that stopped the writer, if any (without raising it)."""
        return self._error

    def __enter__(self) -> "ActivationWriter":
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
                if self._error is not None:
                    self._count(rows_failed=item.n_rows)
                    continue
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
            if not self._dispatch(slice_rows(joined, start, stop)):
                self._count(rows_failed=joined.n_rows - start)
                return [], 0
            start = stop
        if start == joined.n_rows:
            return [], 0
        rest = slice_rows(joined, start, joined.n_rows)
        return [rest], rest.n_rows

    def _rows_per_batch(self, dim: int) -> int:
        return max(1, min(self.batch_rows, self.max_batch_bytes // (4 * dim)))

    def _dispatch(self, rows: ActivationRows) -> bool:
        """Starts one batch on its way (inline, or on a free lane); False once the writer has failed."""
        batch_id = f"{self.writer_id}-{self._seq}"
        self._seq += 1
        if not self._lanes:
            return self._error is None and self._deliver(batch_id, rows)
        self._slots.acquire()  # at most in_flight batches out at once
        if self._error is not None:
            self._slots.release()
            return False
        settled = threading.Event()
        self._outstanding = [event for event in self._outstanding if not event.is_set()]
        self._outstanding.append(settled)
        self._lane_jobs.put((batch_id, rows, settled))
        return True

    def _lane(self) -> None:
        """Delivers dispatched batches, one at a time, until told to stop (None)."""
        while (job := self._lane_jobs.get()) is not None:
            batch_id, rows, settled = job
            try:
                self._deliver(batch_id, rows)
            finally:
                self._slots.release()
                settled.set()

    def _wait_for_outstanding(self) -> None:
        """Until every dispatched batch is acknowledged or has failed."""
        for settled in self._outstanding:
            settled.wait()
        self._outstanding = []

    def _deliver(self, batch_id: str, rows: ActivationRows) -> bool:
        """One batch, retried under one id until acknowledged; False (and the error set) if it never is."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                receipt = self._transport.send(batch_id, rows)
            except TransientError as error:
                if attempt == self.max_attempts:
                    return self._fail(StoreUnavailable(batch_id, attempt, error), rows.n_rows)
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * self._jitter.uniform(0.5, 1.0)
                log.warning("batch %s: attempt %d failed (%s); retrying in %.2f s", batch_id, attempt, error, delay)
                self._count(retries=1)
                time.sleep(delay)
                continue
            except EideticAPIError as error:
                return self._fail(BatchRejected(error, batch_id, rows.n_rows), rows.n_rows)
            except Exception as error:  # a fault in the transport itself: surface it, never die silently
                failure = WriterError(f"batch {batch_id!r}: the transport failed: {error!r}")
                failure.__cause__ = error
                return self._fail(failure, rows.n_rows)
            self._count(rows_sent=rows.n_rows, batches_sent=1, duplicates=int(receipt.duplicate))
            return True
        return False  # unreachable: the last attempt returns above

    def _fail(self, error: WriterError, rows: int) -> bool:
        log.error("activation writer %s stopped: %s", self.writer_id, error)
        with self._lock:
            if self._error is None:  # with batches in flight, the first failure is the one to report
                self._error = error
        self._count(rows_failed=rows)
        return False


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
        try:
            writer.close(timeout=60)
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
        sender = DirectTransport(settings.database_url, run_id, layer_id)
    else:
        raise ValueError(f"transport is 'rest' or 'direct', not {kind!r}")
    options: dict[str, Any] = {
        "batch_rows": settings.writer_batch_rows,
        "max_batch_bytes": settings.writer_max_batch_bytes,
        "queue_size": settings.writer_queue_size,
        "max_attempts": settings.writer_max_attempts,
        "in_flight": settings.writer_in_flight,
    }
    options.update(writer_options)
    return ActivationWriter(sender, **options)
