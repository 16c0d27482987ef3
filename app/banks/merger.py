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

import psycopg

from app.banks.segments import MergeReport, banks_due, merge_bank
from app.database import connect
from app.settings import Settings

log = logging.getLogger(__name__)


def merge_now(database_url: str, settings: Settings, bank_id: int, *, force: bool, wait: bool) -> MergeReport:
    """One merge of one bank on a connection opened for it (the merge route's, and the tests')."""
    with connect(database_url, settings) as conn:
        return merge_bank(
            conn,
            bank_id,
            force=force,
            wait=wait,
            maintenance_work_mem_mb=settings.merge_maintenance_work_mem_mb,
            statement_timeout_ms=settings.scan_timeout_ms,
        )


class BackgroundMerger:
    """Every `merge_interval_s`, merges the banks due; stopping cancels a build in progress (the next
    merge drops what it left)."""

    def __init__(self, database_url: str, settings: Settings) -> None:
        self.database_url = database_url
        self.settings = settings
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
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
                log.warning("background merge failed: %s", error)
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
        for bank_id in banks_due(self._conn):
            if self._stop.is_set():
                break
            reports.append(
                merge_bank(
                    self._conn,
                    bank_id,
                    maintenance_work_mem_mb=self.settings.merge_maintenance_work_mem_mb,
                    statement_timeout_ms=self.settings.scan_timeout_ms,
                )
            )
        return reports

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
