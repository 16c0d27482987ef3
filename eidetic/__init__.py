"""Eidetic: the one name a training script imports.

`import eidetic` gives the REST client, the activation writer and the wire pieces the
service shares (rows, formats, errors) with numpy, pyarrow, httpx and pydantic only: no
torch and nothing of the service. The device caches are in `eidetic.torch` (the one place
torch is imported); the direct COPY transport in `eidetic.direct` loads the service's code
when a writer chooses it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from eidetic.client import EideticAPIError, EideticClient, IncompleteStream, IngestReceipt, LayerInfo, RunInfo
from eidetic.config import ClientSettings
from eidetic.errors import EideticError
from eidetic.transports import RestTransport, TransientError, Transport
from eidetic.wire.rows import ActivationRows
from eidetic.writer import (
    ActivationWriter,
    BatchRejected,
    StoreUnavailable,
    WriterClosed,
    WriterError,
    WriterStats,
    open_writer,
    replay_spill,
)

if TYPE_CHECKING:
    from eidetic import torch

__version__ = "0.1.0"

__all__ = [
    "ActivationRows",
    "ActivationWriter",
    "BatchRejected",
    "ClientSettings",
    "EideticAPIError",
    "EideticClient",
    "EideticError",
    "IncompleteStream",
    "IngestReceipt",
    "LayerInfo",
    "RestTransport",
    "RunInfo",
    "StoreUnavailable",
    "TransientError",
    "Transport",
    "WriterClosed",
    "WriterError",
    "WriterStats",
    "open_writer",
    "replay_spill",
    "torch",
]


def __getattr__(name: str) -> Any:
    """`eidetic.torch` on first use, so a plain `import eidetic` never imports torch."""
    if name == "torch":
        return import_module("eidetic.torch")
    raise AttributeError(f"module 'eidetic' has no attribute {name!r}")
