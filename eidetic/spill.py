"""The writer's spill: batches it could not deliver yet, kept on local disk until the store answers.

One Arrow IPC stream per batch (the ingest route's own format, the batch id in its schema
metadata), named `<seq>-<rows>.arrow` so that the files sort in the order the batches were
cut and a later process can replay them under the same ids. A file is written under a
temporary name and renamed into place, so a crash never leaves a half batch that looks whole.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from eidetic.wire.formats import BATCH_ID_METADATA_KEY, rows_from_arrow, rows_to_arrow
from eidetic.wire.rows import ActivationRows

__all__ = ["SpillDirectory", "SpilledBatch"]

_FILE_NAME = re.compile(r"^(\d{12})-(\d+)\.arrow$")


@dataclass(frozen=True)
class SpilledBatch:
    """One batch on disk: where it is, its place in the order and the id the store must see."""

    seq: int
    batch_id: str
    n_rows: int
    path: Path
    file_bytes: int


class SpillDirectory:
    """The spill of one writer: a directory of its own, made on the first batch that needs it.

    `max_bytes` caps the files held at once (0 = never spill). Thread-safe: the sender saves
    while the lanes load and remove.
    """

    def __init__(self, parent: Path, name_prefix: str, max_bytes: int, *, path: Path | None = None) -> None:
        self.parent = Path(parent)
        self.name_prefix = re.sub(r"[^A-Za-z0-9._-]", "_", name_prefix)
        self.max_bytes = max_bytes
        self._path = path
        self._lock = threading.Lock()
        self._bytes_held = 0

    @classmethod
    def existing(cls, path: Path, max_bytes: int) -> SpillDirectory:
        """A spill left behind by another writer (StoreUnavailable names it), to be replayed."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no spill directory at {path}")
        spill = cls(path.parent, path.name, max_bytes, path=path)
        saved = spill.saved()
        if not saved and any(child.is_dir() for child in path.iterdir()):
            raise ValueError(
                f"{path} holds no spilled batches; pass one writer's directory (StoreUnavailable.spill_path)"
            )
        spill._bytes_held = sum(batch.file_bytes for batch in saved)
        return spill

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def bytes_held(self) -> int:
        return self._bytes_held

    def path(self) -> Path:
        """This writer's directory, made now if it does not exist yet (unique even for equal writer ids)."""
        with self._lock:
            if self._path is None:
                self.parent.mkdir(parents=True, exist_ok=True)
                self._path = Path(tempfile.mkdtemp(prefix=f"{self.name_prefix}-", dir=self.parent))
            return self._path

    @property
    def made(self) -> bool:
        return self._path is not None

    def has_room(self, nbytes: int) -> bool:
        """Whether a batch of about `nbytes` fits under the cap (its file is about as large as its arrays)."""
        return self.enabled and self._bytes_held + nbytes <= self.max_bytes

    def save(self, seq: int, batch_id: str, rows: ActivationRows) -> SpilledBatch:
        """Writes one batch; raises OSError when the disk refuses (full, read-only, gone)."""
        directory = self.path()
        final = directory / f"{seq:012d}-{rows.n_rows}.arrow"
        partial = directory / f".{seq:012d}.partial"
        body = rows_to_arrow(rows, batch_id)
        try:
            partial.write_bytes(body)
            os.replace(partial, final)
        except OSError:
            partial.unlink(missing_ok=True)
            raise
        with self._lock:
            self._bytes_held += len(body)
        return SpilledBatch(seq=seq, batch_id=batch_id, n_rows=rows.n_rows, path=final, file_bytes=len(body))

    def load(self, batch: SpilledBatch) -> ActivationRows:
        """The rows of a spilled batch; ValueError if the file holds another batch than its name says."""
        rows, batch_id = rows_from_arrow(batch.path.read_bytes())
        if batch_id != batch.batch_id or rows.n_rows != batch.n_rows:
            raise ValueError(f"{batch.path} holds batch {batch_id!r} of {rows.n_rows} rows, not {batch.batch_id!r}")
        return rows

    def remove(self, batch: SpilledBatch) -> None:
        """Once the store acknowledged the batch: its file is no longer needed."""
        batch.path.unlink(missing_ok=True)
        with self._lock:
            self._bytes_held -= batch.file_bytes

    def saved(self) -> list[SpilledBatch]:
        """The batches on disk, in the order they were cut."""
        if self._path is None or not self._path.is_dir():
            return []
        found = []
        for path in self._path.iterdir():
            match = _FILE_NAME.match(path.name)
            if match is None:
                continue
            with pa.memory_map(str(path)) as source:  # the schema only: the batch id, not the values
                metadata = pa.ipc.open_stream(source).schema.metadata or {}
            batch_id = metadata.get(BATCH_ID_METADATA_KEY, b"").decode()
            if not batch_id:
                raise ValueError(f"{path} has no batch id: not a spilled batch")
            found.append(
                SpilledBatch(
                    seq=int(match.group(1)),
                    batch_id=batch_id,
                    n_rows=int(match.group(2)),
                    path=path,
                    file_bytes=path.stat().st_size,
                )
            )
        return sorted(found, key=lambda batch: batch.seq)

    def remove_if_empty(self) -> bool:
        """Removes the directory once every batch in it was delivered; True if it is gone (or never made)."""
        if self._path is None:
            return True
        try:
            self._path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:  # batches are still waiting in it
            return False
        return True
