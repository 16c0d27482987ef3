"""How ActivationWriter delivers one batch over REST, and the contract every transport keeps.

Both obey one contract: `send(batch_id, rows)` stores the batch exactly once under its
id (the store's ingest ledger turns a resend into a duplicate acknowledgement), raises
TransientError when sending the same batch again may succeed, and EideticAPIError when
it never will.
"""

from __future__ import annotations

from typing import Protocol

import httpx

from eidetic.client import EideticAPIError, EideticClient, IngestReceipt
from eidetic.wire.formats import rows_to_arrow
from eidetic.wire.rows import ActivationRows


class TransientError(Exception):
    """The batch may or may not have been stored; sending it again under the same id is safe."""


class Transport(Protocol):
    """Delivers batches of one layer; `send` may be called from several of the writer's threads at once."""

    def send(self, batch_id: str, rows: ActivationRows) -> IngestReceipt: ...

    def close(self) -> None: ...


class RestTransport:
    """POSTs each batch as an Arrow IPC stream; 5xx, 408/425/429 and network errors are transient.

    Concurrent sends share the client's connection pool (httpx.Client is thread-safe).
    """

    def __init__(self, client: EideticClient, run_id: int, layer_id: int, *, owns_client: bool = True) -> None:
        self.client = client
        self.run_id = run_id
        self.layer_id = layer_id
        self._owns_client = owns_client

    def send(self, batch_id: str, rows: ActivationRows) -> IngestReceipt:
        body = rows_to_arrow(rows, batch_id)
        try:
            return self.client.ingest_arrow(self.run_id, self.layer_id, batch_id, body)
        except httpx.TransportError as error:
            raise TransientError(f"could not reach the service: {error!r}") from error
        except EideticAPIError as error:
            if error.retryable:
                raise TransientError(str(error)) from error
            raise

    def close(self) -> None:
        if self._owns_client:
            self.client.close()
