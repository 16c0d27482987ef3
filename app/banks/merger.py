"""The service's background merger: it seals the growing segment of every segmented bank that is due.

One thread per service process, on a connection of its own (an index build runs for seconds,
outside any transaction, and must not hold a pooled connection a request waits for). Several
service processes each run one; the advisory lock of `merge_bank` lets one merge a bank at a
time and the others pass it by.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import psycopg

from app.banks.segments import MergeReport, banks_due, merge_bank
from app.database import connect
from app.settings import Settings

log = logging.getLogger(__name__)


def build_options(settings: Settings) -> dict[str, Any]:
    """What every merge's index builds run with: memory, parallel workers, and how long they may take."""
    return {
        "maintenance_work_mem_mb": settings.merge_maintenance_work_mem_mb,
        "build_workers": None if settings.merge_build_workers < 0 else settings.merge_build_workers,
        "statement_timeout_ms": settings.scan_timeout_ms,
    }


def merge_now(
    database_url: str, settings: Settings, bank_id: int, *, force: bool, full: bool = False, wait: bool
) -> MergeReport:
    """One merge of one bank on a connection opened for it (the merge route's, and the tests')."""
    with connect(database_url, settings) as conn:
        return merge_bank(
            conn,
            bank_id,
            force=force,
            full=full,
            wait=wait,
            **build_options(settings),
        )


def start_merge(database_url: str, settings: Settings, bank_id: int, *, full: bool) -> None:
    """`merge_now` on a thread of its own, for the merge route's `wait=false`. The bank's merge lock keeps it
    from racing another merge of the bank; if the service stops first, the build dies with its connection
    and the next merge drops what it left, as after any killed merge."""

    def run() -> None:
        try:
            merge_now(database_url, settings, bank_id, force=True, full=full, wait=True)
        except psycopg.errors.QueryCanceled as error:  # the bank deleted meanwhile, or the statement timeout
            log.warning("merge of bank %s stopped: %s", bank_id, error)
        except Exception:
            log.exception("merge of bank %s failed", bank_id)

    threading.Thread(target=run, name=f"eidetic-merge-{bank_id}", daemon=True).start()


class BackgroundMerger:
    """Every `merge_interval_s`, merges the banks due; a bank written to by nobody for `merge_idle_s` has its
    growing items sealed and its segments compacted into one (a search then walks one graph, as on a bank
    with one live index). Stopping cancels a build in progress (the next merge drops what it left)."""

    def __init__(self, database_url: str, settings: Settings) -> None:
        self.database_url = database_url
        self.settings = settings
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._idle: dict[int, tuple[int, float]] = {}  # bank -> (version last seen, when it was first seen)
        self._settled: dict[int, int] = {}  # bank -> the version it was compacted into one segment at
        self._thread = threading.Thread(target=self._run, name="eidetic-bank-merger", daemon=True)

    def start(self) -> None:
        if self.settings.merge_interval_s > 0:
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.merge_interval_s):
            try:
                self.run_once()
            except psycopg.Error as error:  # the database is down or a build failed: try again next round
                # a bank deleted mid-merge cancels its build (pg_cancel_backend): nothing failed
                cancelled = isinstance(error, psycopg.errors.QueryCanceled) and "user request" in str(error)
                log.log(logging.INFO if cancelled else logging.WARNING, "background merge failed: %s", error)
                self._close()
            except Exception:
                log.exception("background merge failed")
                self._close()
        self._close()

    def run_once(self) -> list[MergeReport]:
        """Merges each bank that is due, unless another merger holds it."""
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.database_url, self.settings)
        reports = []
        due = banks_due(self._conn)
        for bank_id in [*due, *self._idle_banks(self._conn, set(due))]:
            if self._stop.is_set():
                break
            idle = bank_id not in due
            report = merge_bank(
                self._conn,
                bank_id,
                force=idle,
                full=idle,
                **build_options(self.settings),
            )
            if idle and report.merged:
                self._settled[bank_id] = self._idle[bank_id][0]
            reports.append(report)
        return reports

    def _idle_banks(self, conn: psycopg.Connection, due: set[int]) -> list[int]:
        """The segmented banks whose version has not moved for `merge_idle_s` and that are not compacted yet."""
        if self.settings.merge_idle_s <= 0:
            return []
        now = time.monotonic()
        idle = []
        rows = conn.execute("SELECT id, version FROM memory_banks WHERE merge_threshold > 0").fetchall()
        for bank_id, version in rows:
            seen, since = self._idle.get(bank_id, (None, now))
            if seen != version:
                self._idle[bank_id] = (version, now)
            elif (
                now - since >= self.settings.merge_idle_s
                and self._settled.get(bank_id) != version
                and bank_id not in due
            ):
                idle.append(int(bank_id))
        return idle

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
