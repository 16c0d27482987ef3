"""Batched nearest-neighbour search of a bank (exact, or HNSW with an exact fallback), its vote, and hit counts."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from pgvector import Vector
from psycopg import sql
from psycopg.rows import dict_row, scalar_row
from threadpoolctl import ThreadpoolController

from app.banks.growing import GrowingCache, GrowingItems
from app.banks.schema import Bank, items_partition
from app.banks.segments import sealed_segments, version_range
from eidetic.errors import DimensionMismatch
from eidetic.wire.vectors import require_comparable

MAX_EF_SEARCH = 1000  # pgvector's limit
_NOTHING_HELD = GrowingCache(0)  # a search without the service's cache reads the growing items itself
_DISTANCE_BLOCK = 4_000_000  # query-key distances computed at once for the growing items (float64: 32 MB)
DISTANCE_OPERATORS = {"cosine": "<=>", "l2": "<->", "ip": "<#>"}  # pgvector's, by metric


def similarity_from_distance(metric: str, distance: np.ndarray) -> np.ndarray:
    """Higher is more similar: cosine similarity, inner product, or 1/(1+L2 distance).

    A zero key stored before zero vectors were refused is at distance NaN under cosine;
    its similarity is 0 (as in `similarity_matrix`), never a NaN in an answer.
    """
    if metric == "cosine":
        return np.where(np.isnan(distance), 0.0, 1.0 - distance)
    if metric == "ip":
        return -distance
    return 1.0 / (1.0 + distance)


@dataclass(frozen=True)
class Neighbours:
    """The k nearest items of one query, most similar first, and their similarity-weighted vote
    (with their metas when asked for)."""

    ids: list[int]
    scores: list[float]
    labels: list[int | None]
    prediction: int | None
    confidence: float
    metas: list[dict[str, Any] | None] | None = None


def vote(scores: list[float], labels: list[int | None], k: int) -> tuple[int | None, float]:
    """Similarity-weighted vote: each neighbour adds max(score, 0) to its label.

    Confidence is the winning label's weight divided by k, so with k=1 it is the
    nearest item's similarity (the seed's memory confidence), and with larger k it is
    lowered by neighbours that disagree.
    """
    weights: dict[int, float] = {}
    for score, label in zip(scores, labels):
        if label is not None:
            weights[label] = weights.get(label, 0.0) + max(float(score), 0.0)
    if not weights:
        return None, 0.0
    prediction = max(sorted(weights), key=lambda label: weights[label])
    return prediction, weights[prediction] / k


@dataclass(frozen=True)
class _Hit:
    id: int
    label: int | None
    distance: float
    meta: dict[str, Any] | None = None


def search(
    conn: psycopg.Connection,
    bank: Bank,
    queries: np.ndarray,
    k: int,
    *,
    exact: bool,
    ef_search: int,
    labels: list[int] | None,
    with_meta: bool = False,
    growing_cache: GrowingCache | None = None,
) -> list[Neighbours]:
    """Batched k-nearest-neighbour search: one statement for the whole batch of queries.

    The HNSW path raises ef_search to at least k (HNSW returns at most ef_search rows),
    uses iterative index scans under a label filter, and falls back to an exact scan for
    any query that still came back short, so every answer has min(k, matching items) rows.
    `with_meta` also reads each neighbour's meta. `growing_cache`: where a segmented bank's growing items
    are held between searches (the service's); without one they are read for this search.
    """
    if queries.ndim != 2 or queries.shape[1] != bank.dim:
        raise DimensionMismatch(f"bank {bank.name!r} has dimension {bank.dim}", field="queries")
    require_comparable(queries, bank.metric, "queries[{}]")
    operator = sql.SQL(DISTANCE_OPERATORS[bank.metric])
    typed_key = sql.SQL("key::vector({})").format(sql.Literal(bank.dim))
    typed_query = sql.SQL("q.v::vector({})").format(sql.Literal(bank.dim))
    # The exact statement orders by an expression no index matches ("+ 0"), so it scans
    # every item whatever plan psycopg's prepared-statement cache holds; the HNSW one
    # orders by the indexed expression itself.
    index_order = sql.SQL("{} {} {}").format(typed_key, operator, typed_query)
    scan_order = sql.SQL("({} {} {}) + 0, id").format(typed_key, operator, typed_query)
    columns = sql.SQL("id, label, {meta} AS meta, {key} {op} {query} AS distance").format(
        meta=sql.SQL("meta" if with_meta else "NULL::jsonb"), key=typed_key, op=operator, query=typed_query
    )

    def nearest(order: sql.Composable, where: sql.Composable | None = None) -> sql.Composed:
        """The k nearest of one query among the bank's items (those matching `where`), labels filtered."""
        # the bank's id, spelled out: Citus routes the whole statement to the bank's shard by it
        conditions: list[sql.Composable] = [sql.SQL("bank_id = {}").format(sql.Literal(int(bank.id)))]
        conditions += [where] if where is not None else []
        conditions += [sql.SQL("label = ANY(%(labels)s)")] if labels is not None else []
        return sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT %(k)s").format(
            columns, items_partition(bank.id), sql.SQL(" AND ").join(conditions), order
        )

    template = sql.SQL(
        "SELECT q.ord, m.id, m.label, m.distance, m.meta FROM unnest(%(queries)b::vector[]) WITH ORDINALITY q(v, ord) "
        "CROSS JOIN LATERAL ({}) m ORDER BY q.ord, m.distance, m.id"
    )
    exact_statement = template.format(nearest(scan_order))
    segmented = bank.segmented and not exact
    vectors = [Vector(query) for query in queries]
    params: dict[str, Any] = {"queries": vectors, "labels": labels, "k": k}
    with conn.transaction():
        if segmented:  # the sealed segments and the growing items read from one snapshot
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if not exact:
            conn.execute(
                sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(min(max(ef_search, k), MAX_EF_SEARCH)))
            )
            if labels is not None:
                conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        if exact:
            found = _group(conn.cursor(row_factory=dict_row).execute(exact_statement, params).fetchall(), len(queries))
        elif segmented:
            # the older sealed segments each through its own partial index, merged by distance with the growing
            # items and the newest small segments, held (or read) and compared with every query at once (an
            # exact scan per query in SQL is tens of times slower); a merge meanwhile changes no answer
            held = growing_cache if growing_cache is not None else _NOTHING_HELD
            segments = held.indexed(bank, sealed_segments(conn, bank.id))
            found = [[] for _ in range(len(queries))]
            if segments:
                branches = [nearest(index_order, version_range(s.lo, s.hi)) for s in segments]
                statement = template.format(
                    sql.SQL("SELECT * FROM ({}) s ORDER BY distance, id LIMIT %(k)s").format(
                        sql.SQL(" UNION ALL ").join(sql.SQL("({})").format(b) for b in branches)
                    )
                )
                found = _group(conn.cursor(row_factory=dict_row).execute(statement, params).fetchall(), len(queries))
            growing = _hits(conn, bank, queries, held.growing(conn, bank, segments).labelled(labels), k, with_meta)
            found = [sorted(a + b, key=_rank)[:k] for a, b in zip(found, growing)]
        else:
            statement = template.format(nearest(index_order))
            found = _group(conn.cursor(row_factory=dict_row).execute(statement, params).fetchall(), len(queries))
        if not exact:
            came_short = [i for i, hits in enumerate(found) if len(hits) < k]
            matching = _matching_count(conn, bank, labels) if came_short else k  # a look-up only when needed
            short = [i for i in came_short if len(found[i]) < min(k, matching)]
            if short:  # the index came back short (filters, tiny ef_search): answer these exactly
                retry = (
                    conn.cursor(row_factory=dict_row)
                    .execute(exact_statement, {**params, "queries": [vectors[i] for i in short]})
                    .fetchall()
                )
                for i, hits in zip(short, _group(retry, len(short))):
                    found[i] = hits
    answers = []
    for hits in found:
        scores = similarity_from_distance(bank.metric, np.array([h.distance for h in hits], dtype=np.float64)).tolist()
        item_labels = [h.label for h in hits]
        prediction, confidence = vote(scores, item_labels, k)
        metas = [h.meta for h in hits] if with_meta else None
        answers.append(Neighbours([h.id for h in hits], scores, item_labels, prediction, confidence, metas))
    return answers


def distances(metric: str, queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """pgvector's distance of every query to every key (queries x keys): cosine distance (NaN for a zero
    key, as pgvector), L2 distance, or the negative inner product."""
    queries64, keys64 = queries.astype(np.float64), keys.astype(np.float64, copy=False)
    dots = queries64 @ keys64.T
    if metric == "ip":
        return -dots
    if metric == "l2":
        squared = (queries64**2).sum(1)[:, None] + (keys64**2).sum(1)[None, :] - 2 * dots
        return np.sqrt(np.maximum(squared, 0.0))
    norms = np.linalg.norm(queries64, axis=1)[:, None] * np.linalg.norm(keys64, axis=1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norms > 0, 1.0 - dots / norms, np.nan)


def _rank(hit: _Hit) -> tuple[float, int]:
    """The statement's order: by distance (NaN last, as pgvector sorts it), then id."""
    return (np.inf if np.isnan(hit.distance) else hit.distance, hit.id)


def nearest_positions(
    metric: str, queries: np.ndarray, keys: np.ndarray, ids: np.ndarray, k: int, key_norms: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each query, the positions of its min(k, keys) nearest keys and their distances (pgvector's,
    computed in float64), ordered as pgvector's exact scan orders them: by distance, NaN last, then id.

    Screened in float32 first (one matmul; the float64 distance of every key cost a search of 60,000
    growing items 0.5-0.7 s against 0.02 s), then every key whose screened distance is within a float32
    error bound of a bound on the query's k-th is measured again in float64: the k nearest are among those.
    `key_norms`: the keys' L2 norms, when the caller holds them.

    On one BLAS thread: a search is one request among others, and with two threads the matmul fought a
    merge's index build for the 2 CPUs here and ran at half speed (1,000 against 1,800 queries/s; one
    thread kept 1,800 while the build ran).
    """
    n = len(keys)
    nearest = min(k, n)
    if nearest == 0:
        return [(np.empty(0, dtype=np.int64), np.empty(0)) for _ in range(len(queries))]
    keys32 = np.ascontiguousarray(keys, dtype=np.float32)
    norms = np.linalg.norm(keys32, axis=1) if key_norms is None else key_norms
    found: list[tuple[np.ndarray, np.ndarray]] = []
    block = max(1, _DISTANCE_BLOCK // n)  # queries at a time: the matrix stays tens of MB
    with _ONE_BLAS_THREAD:
        for start in range(0, len(queries), block):
            found += _nearest_block(metric, queries[start : start + block], keys32, ids, norms, nearest)
    return found


def _nearest_block(
    metric: str, queries: np.ndarray, keys32: np.ndarray, ids: np.ndarray, norms: np.ndarray, nearest: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`nearest_positions` for a block of queries."""
    screened, tolerance = _screen(metric, np.ascontiguousarray(queries, dtype=np.float32), keys32, norms)
    within = screened <= (_kth_bound(screened, nearest) + tolerance)[:, None]
    found = []
    for i, row in enumerate(within):
        candidates = np.flatnonzero(row)
        exact = distances(metric, queries[i : i + 1], keys32[candidates])[0]
        order = np.lexsort((ids[candidates], np.where(np.isnan(exact), np.inf, exact)))[:nearest]
        found.append((candidates[order], exact[order]))
    return found


class _OneBlasThread:
    """Holds numpy's BLAS at one thread while any scan of growing items runs. The limit is the process's, not
    a thread's: the first scan in sets it and the last out restores it, so overlapping scans never leave it set."""

    def __init__(self) -> None:
        self._controller = ThreadpoolController()
        self._lock = threading.Lock()
        self._inside = 0
        self._limiter: Any = None

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._inside += 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                self._limiter.restore_original_limits()


_ONE_BLAS_THREAD = _OneBlasThread()
_GROUP = 64  # keys per group whose minimum bounds the k-th screened distance


def _kth_bound(screened: np.ndarray, nearest: int) -> np.ndarray:
    """Per row, a value at or above its `nearest`-th smallest: the `nearest`-th smallest of the minima of
    groups of `_GROUP` keys (those minima are that many distinct keys at or below it). A partition of the
    minima is tens of times cheaper than one of the whole row; with too few groups, the row's own."""
    rows, n = screened.shape
    groups = n // _GROUP
    if groups < 4 * nearest:
        return np.partition(screened, nearest - 1, axis=1)[:, nearest - 1]
    minima = screened[:, : groups * _GROUP].reshape(rows, groups, _GROUP).min(axis=2)
    if n > groups * _GROUP:
        minima = np.concatenate([minima, screened[:, groups * _GROUP :].min(axis=1, keepdims=True)], axis=1)
    return np.partition(minima, nearest - 1, axis=1)[:, nearest - 1]


def _screen(metric: str, queries: np.ndarray, keys: np.ndarray, key_norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 scores that order keys as the metric's distance does (lower is nearer; a zero key under
    cosine, whose distance is NaN, last), and per query a bound well above their rounding error. One
    matmul and at most one pass over its result: the queries are scaled, not the scores."""
    query_norms = np.linalg.norm(queries, axis=1)
    top = float(key_norms.max(initial=0.0))
    if metric == "ip":
        return (-queries) @ keys.T, 1e-4 * query_norms * top + 1e-30
    if metric == "l2":  # the squared L2 distance less the query's own squared norm
        screened = (-2 * queries) @ keys.T
        screened += key_norms**2
        return screened, 1e-4 * (query_norms**2 + top**2) + 1e-30
    unit = -queries / np.maximum(query_norms, 1e-30)[:, None]
    with np.errstate(divide="ignore"):
        screened = unit @ keys.T
        screened *= np.where(key_norms > 0, 1 / key_norms, 0).astype(np.float32)
    zero = np.flatnonzero(key_norms == 0)
    if len(zero):
        screened[:, zero] = np.inf
    return screened, np.full(len(queries), 1e-4, dtype=np.float32)


def _hits(
    conn: psycopg.Connection, bank: Bank, queries: np.ndarray, items: GrowingItems, k: int, with_meta: bool
) -> list[list[_Hit]]:
    """The k nearest of `items` for each query, exactly, computed here (with their metas, read by id)."""
    chosen = nearest_positions(bank.metric, queries, items.keys, items.ids, k, items.norms)
    metas: dict[int, Any] = {}
    if with_meta and len(items):
        wanted = sorted({int(items.ids[j]) for positions, _ in chosen for j in positions.tolist()})
        metas = dict(
            conn.execute(
                sql.SQL("SELECT id, meta FROM {} WHERE id = ANY(%s)").format(items_partition(bank.id)), (wanted,)
            ).fetchall()
        )
    found = []
    for positions, exact in chosen:
        found.append(
            [
                _Hit(
                    int(items.ids[j]),
                    int(items.labels[j]) if items.has_label[j] else None,
                    float(d),
                    metas.get(int(items.ids[j])),
                )
                for j, d in zip(positions.tolist(), exact.tolist())
            ]
        )
    return found


def _group(rows: list[dict], n_queries: int) -> list[list[_Hit]]:
    """The hits of each query (rows carry the query's 1-based ordinal), in the statement's order."""
    grouped: list[list[_Hit]] = [[] for _ in range(n_queries)]
    for row in rows:
        grouped[row["ord"] - 1].append(_Hit(row["id"], row["label"], float(row["distance"]), row["meta"]))
    return grouped


def _matching_count(conn: psycopg.Connection, bank: Bank, labels: list[int] | None) -> int:
    """How many items a search may return: the bank's size, or the items with one of `labels`."""
    if labels is None:
        query = conn.cursor(row_factory=scalar_row).execute("SELECT size FROM memory_banks WHERE id = %s", (bank.id,))
    else:
        statement = sql.SQL("SELECT count(*) FROM {} WHERE label = ANY(%s)").format(items_partition(bank.id))
        query = conn.cursor(row_factory=scalar_row).execute(statement, (labels,))
    count = query.fetchone()
    return 0 if count is None else int(count)


def record_hits(conn: psycopg.Connection, bank: Bank, answers: list[Neighbours]) -> None:
    """Counts a hit for the nearest item of each query (the device caches keep the most-hit items)."""
    counts: dict[int, int] = {}
    for answer in answers:
        if answer.ids:
            counts[answer.ids[0]] = counts.get(answer.ids[0], 0) + 1
    if counts:
        conn.execute(
            "INSERT INTO memory_hits (bank_id, item_id, hits) SELECT %s, h.id, h.n "
            "FROM unnest(%s::bigint[], %s::bigint[]) h(id, n) ORDER BY h.id "
            "ON CONFLICT (bank_id, item_id) DO UPDATE SET hits = memory_hits.hits + EXCLUDED.hits",
            (bank.id, sorted(counts), [counts[i] for i in sorted(counts)]),
        )
