"""A segmented bank's segments, and the merge that seals its growing items and compacts its sealed segments.

Items are written without touching any HNSW graph: they land in the growing segment, every
item above the last sealed version, searched exactly. A merge seals the growing items into
a segment, a range of bank versions (lo, hi], by building a partial HNSW index
`WHERE version > lo AND version <= hi` on the bank's partition in bulk (CREATE INDEX
CONCURRENTLY: writers and searches go on meanwhile); sealed segments of one size tier are
compacted into one (fan-in `merge_factor`), so a search visits a few indexes, not one per merge.

Why version ranges on the bank's one partition, and not a table per segment: an item
replaced later takes a new version, so it leaves its sealed segment by itself and its new
tuple matches no segment's index (no graph insert, no row to move); ids, versions, the
change feed, policies and deletions read and write the partition exactly as an unsegmented
bank does; and search is right whatever indexes exist, since each segment is a WHERE
clause: a missing or half-built index only makes that branch an exact scan. The price, a
heap scan of the whole partition per build, is small beside the graph build (bench/RESULTS.md).

`memory_segments` lists the segments whose index is built; only the merge writes it, under a
per-bank advisory lock (one merger per bank, whatever the number of service processes), and
each change of it is one transaction. A merge that dies leaves at worst an index the list
does not name, dropped by the next merge.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.rows import class_row, scalar_row

from app.banks.schema import Bank, bank_by_id, hnsw_index, items_partition, merge_unlock, try_merge_lock
from app.database import one_row


@dataclass(frozen=True)
class Segment:
    """A sealed segment: the bank's items with a version in (lo, hi], `rows` of them when it was built."""

    lo: int
    hi: int
    rows: int


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: rows sealed, segments compacted away, and the segments and growing rows after it."""

    merged: bool  # False: another merger held the bank, or the bank is not segmented
    sealed_rows: int = 0
    compacted_segments: int = 0
    segments: list[Segment] = field(default_factory=list)
    growing_rows: int = 0


def index_name(bank_id: int, segment: Segment | tuple[int, int]) -> str:
    lo, hi = (segment.lo, segment.hi) if isinstance(segment, Segment) else segment
    return f"memory_items_b{int(bank_id)}_v{int(lo)}_{int(hi)}"


def version_range(lo: int, hi: int) -> sql.Composed:
    """A segment's predicate, with its bounds spelled out: a partial index serves a query only when the
    planner can prove the query's WHERE implies it, which it can with constants and not with parameters."""
    return sql.SQL("version > {} AND version <= {}").format(sql.Literal(int(lo)), sql.Literal(int(hi)))


def unsealed_ranges(segments: list[Segment]) -> list[tuple[int, int | None]]:
    """The version ranges (lo, hi] no sealed segment holds (hi None: no bound), lowest first: the growing
    segment, and any gap (though a merge leaves none), so sealed segments and these cover every item once."""
    ranges: list[tuple[int, int | None]] = []
    edge = 0
    for segment in sorted(segments, key=lambda s: s.lo):
        if segment.lo > edge:
            ranges.append((edge, segment.lo))
        edge = max(edge, segment.hi)
    return [*ranges, (edge, None)]


def unsealed(segments: list[Segment]) -> sql.Composed:
    """`unsealed_ranges` as a predicate."""
    gaps = [
        sql.SQL("(version > {}{})").format(
            sql.Literal(lo), sql.SQL("") if hi is None else sql.SQL(" AND version <= {}").format(sql.Literal(hi))
        )
        for lo, hi in unsealed_ranges(segments)
    ]
    return sql.SQL("({})").format(sql.SQL(" OR ").join(gaps))


def sealed_segments(conn: psycopg.Connection, bank_id: int) -> list[Segment]:
    return (
        conn.cursor(row_factory=class_row(Segment))
        .execute("SELECT lo, hi, rows FROM memory_segments WHERE bank_id = %s ORDER BY lo", (bank_id,))
        .fetchall()
    )


def growing_rows(conn: psycopg.Connection, bank_id: int, segments: list[Segment], limit: int | None = None) -> int:
    """How many items the growing segment holds (counted up to `limit` when given)."""
    inner = sql.SQL("SELECT 1 FROM {} WHERE bank_id = {} AND {}{}").format(
        items_partition(bank_id),
        sql.Literal(int(bank_id)),
        unsealed(segments),
        sql.SQL("") if limit is None else sql.SQL(" LIMIT {}").format(sql.Literal(int(limit))),
    )
    statement = sql.SQL("SELECT count(*) FROM ({}) g").format(inner)
    return int(one_row(conn.cursor(row_factory=scalar_row).execute(statement)))


def banks_due(conn: psycopg.Connection) -> list[int]:
    """The segmented banks whose growing segment has reached their merge threshold (a statement per bank,
    each on one bank's rows: on Citus each goes to one shard)."""
    due = []
    for bank_id, threshold in conn.execute(
        "SELECT id, merge_threshold FROM memory_banks WHERE merge_threshold > 0 ORDER BY id"
    ).fetchall():
        if growing_rows(conn, bank_id, sealed_segments(conn, bank_id), limit=threshold) >= threshold:
            due.append(int(bank_id))
    return due


def merge_bank(
    conn: psycopg.Connection,
    bank_id: int,
    *,
    force: bool = False,
    full: bool = False,
    wait: bool = False,
    maintenance_work_mem_mb: int = 256,
    build_workers: int | None = None,
    statement_timeout_ms: int = 600_000,
) -> MergeReport:
    """Seals the growing segment (when it holds `merge_threshold` items, or any with `force`), then compacts
    (`full`: every sealed segment into one, as once writes have stopped: a search then walks one graph).

    `conn` must be in autocommit mode (CREATE INDEX CONCURRENTLY runs outside a transaction) and is
    this merge's alone. `wait`: wait for another merger of the bank to finish instead of giving up.
    `build_workers`: the parallel workers an index build may use (None: PostgreSQL's own setting).
    """
    if not conn.autocommit:
        raise ValueError("a merge needs a connection in autocommit mode")
    bank = bank_by_id(conn, bank_id)
    if bank is None or not bank.segmented:
        return MergeReport(merged=False)
    if not _lock(conn, bank.id, wait_s=statement_timeout_ms / 1000 if wait else 0.0):
        return MergeReport(merged=False)
    try:
        conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(f"{int(maintenance_work_mem_mb)}MB")))
        conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(int(statement_timeout_ms))))
        if build_workers is not None:
            conn.execute(sql.SQL("SET max_parallel_maintenance_workers = {}").format(sql.Literal(int(build_workers))))
        _repair(conn, bank)
        sealed = _seal(conn, bank, force=force)
        compacted = _compact(conn, bank, full=full)
        segments = sealed_segments(conn, bank.id)
        return MergeReport(True, sealed, compacted, segments, growing_rows(conn, bank.id, segments))
    finally:
        if not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            merge_unlock(conn, bank.id)
            conn.execute("RESET statement_timeout")
            conn.execute("RESET maintenance_work_mem")
            conn.execute("RESET max_parallel_maintenance_workers")


def _lock(conn: psycopg.Connection, bank_id: int, *, wait_s: float) -> bool:
    """The bank's merge lock (session-level: a merger that dies lets it go), tried until `wait_s` has passed.

    Never a blocking pg_advisory_lock: a statement waiting on it is a transaction in progress, which
    the holder's CREATE INDEX CONCURRENTLY waits for in turn (a deadlock).
    """
    deadline = time.monotonic() + wait_s
    while True:
        taken = try_merge_lock(conn, bank_id)
        if taken or time.monotonic() >= deadline:
            return taken
        time.sleep(0.05)


def _index_validity(conn: psycopg.Connection, bank: Bank) -> dict[str, bool]:
    """The segment indexes on the bank's partition, by name, and whether each is valid (usable)."""
    rows = conn.execute(
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = to_regclass(%s)",
        (f"memory_items_b{int(bank.id)}",),
    ).fetchall()
    prefix = f"memory_items_b{int(bank.id)}_v"
    return {name: bool(valid) for name, valid in rows if name.startswith(prefix)}


def _drop_index(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))


def _repair(conn: psycopg.Connection, bank: Bank) -> None:
    """What a merge that died left behind: indexes the segment list does not name (dropped), and a listed
    segment whose index is missing or invalid (built again)."""
    indexes = _index_validity(conn, bank)
    listed = {index_name(bank.id, segment): segment for segment in sealed_segments(conn, bank.id)}
    for name in indexes.keys() - listed.keys():
        _drop_index(conn, name)
    for name, segment in listed.items():
        if not indexes.get(name, False):
            _build(conn, bank, segment.lo, segment.hi)


def _build(conn: psycopg.Connection, bank: Bank, lo: int, hi: int) -> None:
    """The segment's HNSW index, built in bulk over its items while writers and searches go on."""
    name = index_name(bank.id, (lo, hi))
    for attempt in range(3):
        _drop_index(conn, name)  # an invalid one of the same name, left by a build that died
        try:
            conn.execute(hnsw_index(bank, sql.Identifier(name), where=version_range(lo, hi), concurrently=True))
            return
        except psycopg.errors.DeadlockDetected:  # two concurrent builds (other banks) can wait on each other
            if attempt == 2:
                raise


def _count(conn: psycopg.Connection, bank: Bank, lo: int, hi: int) -> int:
    statement = sql.SQL("SELECT count(*) FROM {} WHERE bank_id = {} AND {}").format(
        items_partition(bank.id), sql.Literal(int(bank.id)), version_range(lo, hi)
    )
    return int(one_row(conn.cursor(row_factory=scalar_row).execute(statement)))


def _seal(conn: psycopg.Connection, bank: Bank, *, force: bool) -> int:
    """Seals every item up to the bank's committed version; returns how many (0: not yet due)."""
    segments = sealed_segments(conn, bank.id)
    lo = segments[-1].hi if segments else 0
    hi = int(one_row(conn.execute("SELECT version FROM memory_banks WHERE id = %s", (bank.id,)))[0])
    rows = _count(conn, bank, lo, hi) if hi > lo else 0
    if rows == 0 or (rows < bank.merge_threshold and not force):
        return 0
    _build(conn, bank, lo, hi)
    conn.execute("INSERT INTO memory_segments (bank_id, lo, hi, rows) VALUES (%s, %s, %s, %s)", (bank.id, lo, hi, rows))
    # fresh statistics: with the versions of a new segment unknown to the planner, it would read the
    # segment through the version btree and sort it instead of walking the segment's graph
    conn.execute(sql.SQL("ANALYZE {}").format(items_partition(bank.id)))
    return rows


def tier(rows: int, merge_threshold: int, merge_factor: int) -> int:
    """A segment's size tier: 0 up to merge_factor x the threshold, then one more per factor."""
    return max(0, math.floor(math.log(max(rows, 1) / merge_threshold, merge_factor)))


def compaction_group(segments: list[Segment], merge_threshold: int, merge_factor: int) -> list[Segment]:
    """The oldest `merge_factor` adjacent segments of one tier, or none: each item is rebuilt about
    log_factor(bank size / threshold) times over the bank's life, and a search visits a few segments per tier."""
    run: list[Segment] = []
    for segment in segments:
        level = tier(segment.rows, merge_threshold, merge_factor)
        if run and level != tier(run[0].rows, merge_threshold, merge_factor):
            run = []
        run.append(segment)
        if len(run) == merge_factor:
            return run
    return []


def _compact(conn: psycopg.Connection, bank: Bank, *, full: bool = False) -> int:
    """Compacts while a tier holds `merge_factor` segments (`full`: all into one); returns how many segments
    were compacted away."""
    compacted = 0

    def next_group() -> list[Segment]:
        segments = sealed_segments(conn, bank.id)
        if full:
            return segments if len(segments) > 1 else []
        return compaction_group(segments, bank.merge_threshold, bank.merge_factor)

    while group := next_group():
        lo, hi = group[0].lo, group[-1].hi
        _build(conn, bank, lo, hi)
        rows = _count(conn, bank, lo, hi)  # items replaced or deleted since left their segments
        with conn.transaction():
            conn.execute(
                "DELETE FROM memory_segments WHERE bank_id = %s AND lo = ANY(%s)", (bank.id, [s.lo for s in group])
            )
            conn.execute(
                "INSERT INTO memory_segments (bank_id, lo, hi, rows) VALUES (%s, %s, %s, %s)", (bank.id, lo, hi, rows)
            )
        for segment in group:
            _drop_index(conn, index_name(bank.id, segment))
        compacted += len(group)
    return compacted
