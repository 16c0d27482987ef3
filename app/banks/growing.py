"""The growing items of segmented banks, held in the service's memory and brought up to each search's snapshot
from the change feed.

A search of a segmented bank compares its queries with every growing item exactly. Read from the
database for every request, those items cost a search tens of MB once writes outrun the merges
(bench/RESULTS.md, "Bank writes"). Instead each service process keeps, per bank it searches, the
items above a version floor as arrays, and brings them to the search's snapshot by reading only what
changed: the items with a version above the held one, and the tombstones left since. This is exact,
not a best effort: every change of a bank (insert, replacement, deletion) bumps its version under the
bank row's lock, so a snapshot that shows bank version V shows every change up to V and none after,
and the changes from the held version to V are exactly the items and tombstones in that range. A view
that cannot serve a snapshot (one older than the view, or one that needs items the view dropped when a
merge sealed them) is read from the database instead, as without the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import scalar_row

from app.banks.schema import Bank, items_partition
from app.banks.segments import Segment, unsealed, unsealed_ranges
from app.copy_binary import iter_bigint_vectors
from app.database import one_row


@dataclass(frozen=True)
class GrowingItems:
    """Items as arrays, in no particular order: ids, versions, labels (0 where `has_label` is False), keys
    and their L2 norms (computed once, not per search)."""

    ids: np.ndarray
    versions: np.ndarray
    labels: np.ndarray
    has_label: np.ndarray
    keys: np.ndarray
    norms: np.ndarray

    @staticmethod
    def empty(dim: int) -> GrowingItems:
        ints = np.empty(0, dtype=np.int64)
        keys = np.empty((0, dim), dtype=np.float32)
        return GrowingItems(ints, ints, ints, np.empty(0, dtype=bool), keys, np.empty(0, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays())

    def where(self, mask: np.ndarray) -> GrowingItems:
        return GrowingItems(*(a[mask] for a in self._arrays()))

    def plus(self, other: GrowingItems) -> GrowingItems:
        return GrowingItems(*(np.concatenate([a, b]) for a, b in zip(self._arrays(), other._arrays())))

    def in_ranges(self, ranges: list[tuple[int, int | None]]) -> GrowingItems:
        """The items with a version in one of the ranges (lo, hi] (hi None: no bound)."""
        mask = np.zeros(len(self), dtype=bool)
        for lo, hi in ranges:
            mask |= (self.versions > lo) & (True if hi is None else self.versions <= hi)
        return self if mask.all() else self.where(mask)

    def labelled(self, labels: list[int] | None) -> GrowingItems:
        """The items whose label is one of `labels` (all of them when None)."""
        if labels is None:
            return self
        return self.where(self.has_label & np.isin(self.labels, np.asarray(labels, dtype=np.int64)))

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return self.ids, self.versions, self.labels, self.has_label, self.keys, self.norms


def read_items(conn: psycopg.Connection, bank: Bank, where: sql.Composable) -> GrowingItems:
    """The bank's items matching `where`, read by one binary COPY in the transaction's snapshot."""
    select = sql.SQL(
        "SELECT id, version, coalesce(label, 0)::bigint, (label IS NULL)::int::bigint, key "
        "FROM {} WHERE bank_id = {} AND {}"
    ).format(items_partition(bank.id), sql.Literal(int(bank.id)), where)
    chunks = list(iter_bigint_vectors(conn, select, [], 4, bank.dim))
    if not chunks:
        return GrowingItems.empty(bank.dim)
    ints = np.concatenate([c[0] for c in chunks])
    keys = np.concatenate([c[1] for c in chunks])
    norms = np.linalg.norm(keys, axis=1)
    return GrowingItems(ints[:, 0].copy(), ints[:, 1].copy(), ints[:, 2].copy(), ints[:, 3] == 0, keys, norms)


def snapshot_version(conn: psycopg.Connection, bank_id: int) -> int:
    """The bank's version in the snapshot of `conn`'s transaction."""
    statement = "SELECT version FROM memory_banks WHERE id = %s"
    return int(one_row(conn.cursor(row_factory=scalar_row).execute(statement, (bank_id,))))


@dataclass(frozen=True)
class _View:
    """A bank's items with a version above `floor`, as bank version `version` shows them."""

    version: int
    floor: int
    items: GrowingItems


class GrowingCache:
    """Per bank, the items above its indexed segments, followed through the change feed; at most `max_bytes`
    in all (the banks searched longest ago are dropped first; 0 holds nothing). Safe across threads: a view
    is never changed, only replaced by a newer one.

    The newest sealed segments, while they hold at most `exact_values` values (rows x dim) together, are
    held and searched exactly with the growing items rather than through their HNSW indexes: the scan of
    55,000 x 128 keys costs a query about 0.4 ms here on one thread, about what a walk of one graph through
    SQL costs (bench/RESULTS.md), and each segment searched by index adds a walk to every query.
    """

    def __init__(self, max_bytes: int, exact_values: int = 0) -> None:
        self.max_bytes = max_bytes
        self.exact_values = exact_values
        self._views: OrderedDict[int, _View] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # whole reads of a growing segment (the cache could not serve the snapshot)
        self.catch_ups = 0  # reads of the changes since a held view

    def indexed(self, bank: Bank, segments: list[Segment]) -> list[Segment]:
        """The sealed segments a search walks through their indexes: all but the newest that fit in
        `exact_values` (none are held when nothing may be)."""
        if self.max_bytes <= 0:
            return segments
        held = 0
        ordered = sorted(segments, key=lambda s: s.lo)
        for cut in range(len(ordered), 0, -1):
            held += ordered[cut - 1].rows * bank.dim
            if held > self.exact_values:
                return ordered[:cut]
        return []

    def growing(self, conn: psycopg.Connection, bank: Bank, segments: list[Segment]) -> GrowingItems:
        """The bank's items that none of `segments` holds (its growing items, and those of sealed segments
        left out of `segments`) in the snapshot of `conn`'s transaction, which `segments` were read in."""
        if self.max_bytes <= 0:
            return read_items(conn, bank, unsealed(segments))
        ranges = unsealed_ranges(segments)
        floor = ranges[0][0]
        version = snapshot_version(conn, bank.id)
        with self._lock:
            view = self._views.get(bank.id)
        if view is not None and view.version == version and view.floor <= floor:
            fresh = view
        elif view is not None and view.version < version and view.floor <= floor:
            fresh = self._catch_up(conn, bank, view, version, floor)
        else:
            self.reads += 1
            fresh = _View(version, floor, read_items(conn, bank, _above(floor)))
        self._keep(bank.id, fresh)
        return fresh.items.in_ranges(ranges)

    def forget(self, bank_id: int) -> None:
        """Lets a deleted bank's items go now rather than when the budget runs short."""
        with self._lock:
            self._views.pop(bank_id, None)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(view.items.nbytes for view in self._views.values())

    def _catch_up(self, conn: psycopg.Connection, bank: Bank, view: _View, version: int, floor: int) -> _View:
        """`view` brought to `version`: items written since replace their old selves, tombstones remove
        theirs, and items a merge has sealed since (at or below `floor`) are let go."""
        self.catch_ups += 1
        written = read_items(conn, bank, _above(view.version))
        gone = conn.execute(
            "SELECT item_id FROM memory_tombstones WHERE bank_id = %s AND version > %s AND version <= %s",
            (bank.id, view.version, version),
        ).fetchall()
        stale = np.concatenate([written.ids, np.array([row[0] for row in gone], dtype=np.int64)])
        held = view.items
        keep = (held.versions > floor) & ~np.isin(held.ids, stale)
        return _View(version, floor, held.where(keep).plus(written.in_ranges([(floor, None)])))

    def _keep(self, bank_id: int, view: _View) -> None:
        """Holds `view` unless a newer one is held (or it alone is over budget), then lets the least recently
        searched banks go while over budget."""
        with self._lock:
            held = self._views.get(bank_id)
            if held is not None and held.version > view.version:
                view = held
            if view.items.nbytes > self.max_bytes:
                self._views.pop(bank_id, None)
                return
            self._views[bank_id] = view
            self._views.move_to_end(bank_id)
            total = sum(v.items.nbytes for v in self._views.values())
            while total > self.max_bytes:
                _, dropped = self._views.popitem(last=False)
                total -= dropped.items.nbytes


def _above(version: int) -> sql.Composed:
    return sql.SQL("version > {}").format(sql.Literal(int(version)))
