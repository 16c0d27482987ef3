"""The direct transport: batches COPYed straight into the database by the store's own ingest code.

For trusted workers beside the database. It needs the service's modules (psycopg, pgvector,
datasketches), so nothing imports this module until a writer asks for the direct transport:
`import eidetic` stays free of the server's dependencies.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import psycopg

from app import ingest as store_ingest
from app.database import connect
from app.runs import Layer, find_layer
from app.settings import Settings as StoreSettings
from eidetic.client import EideticAPIError, IngestReceipt
from eidetic.errors import EideticError, NotFound
from eidetic.transports import TransientError

if TYPE_CHECKING:
    from eidetic.wire.rows import ActivationRows

__all__ = ["DirectTransport"]


class DirectTransport:
    """Ingests through the store's own code on a database connection, for trusted workers.

    It runs the same checks and the same exactly-once ledger as the REST route, so the two
    transports store identical rows; it only skips HTTP and the API key. Connection
    failures are transient: the connection is opened again for the next attempt. Each
    sending thread has its own connection (a psycopg connection runs one transaction).
    """

    def __init__(
        self, database_url: str, run_id: int, layer_id: int, store_settings: StoreSettings | None = None
    ) -> None:
        self.database_url = database_url
        self.run_id = run_id
        self.layer_id = layer_id
        self.store_settings = store_settings or StoreSettings()  # the service's limits, checked the same way
        self._local = threading.local()  # .conn: this thread's connection
        self._opened: list[psycopg.Connection] = []  # every thread's, for close()
        self._opened_lock = threading.Lock()
        self._layer: Layer | None = None

    def send(self, batch_id: str, rows: ActivationRows) -> IngestReceipt:
        try:
            conn = self._connection()
            if self._layer is None:
                self._layer = self._find_layer(conn)
            result = store_ingest.store_batch(conn, self._layer, batch_id, rows, self.store_settings)
        except EideticError as error:
            raise EideticAPIError(error.status_code, error.code, error.message, error.field) from error
        except psycopg.OperationalError as error:
            self._drop_connection()
            raise TransientError(f"database unavailable: {error}") from error
        except psycopg.Error as error:
            raise EideticAPIError(500, "database_error", str(error)) from error
        return IngestReceipt(batch_id=result.batch_id, rows=result.rows, duplicate=result.duplicate)

    def _find_layer(self, conn: psycopg.Connection) -> Layer:
        layer = find_layer(conn, self.layer_id)
        if layer.run_id != self.run_id:  # the same answer the REST route gives for another run's layer
            raise NotFound(f"layer {self.layer_id} not found in run {self.run_id}", field="layer_id")
        return layer

    def _connection(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            self._drop_connection()
            # Autocommit: ingest() opens its own transaction, which must be the outermost one.
            conn = connect(self.database_url, self.store_settings, autocommit=True)
            self._local.conn = conn
            with self._opened_lock:
                self._opened.append(conn)
        return conn

    def _drop_connection(self) -> None:
        """Closes this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._opened_lock:
                if conn in self._opened:
                    self._opened.remove(conn)
            _close_quietly(conn)

    def close(self) -> None:
        """Closes every thread's connection; call it once no send is running."""
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            _close_quietly(conn)


def _close_quietly(conn: psycopg.Connection) -> None:
    with contextlib.suppress(psycopg.Error):
        conn.close()
