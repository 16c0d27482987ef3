"""Batched nearest-neighbour search of a bank (exact, or HNSW with an exact fallback), its vote, and hit counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from pgvector import Vector
from psycopg import sql
from psycopg.rows import dict_row, scalar_row

from app.banks.schema import Bank, items_partition
from app.banks.segments import sealed_segments, unsealed, version_range
from app.copy_binary import iter_vectors
from eidetic.errors import DimensionMismatch
from eidetic.wire.vectors import require_comparable

MAX_EF_SEARCH = 1000  # pgvector's limit
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
) -> list[Neighbours]:
    """Batched k-nearest-neighbour search: one statement for the whole batch of queries.

    The HNSW path raises ef_search to at least k (HNSW returns at most ef_search rows),
    uses iterative index scans under a label filter, and falls back to an exact scan for
    any query that still came back short, so every answer has min(k, matching items) rows.
    `with_meta` also reads each neighbour's meta.
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
            # each sealed segment through its own partial index, merged by distance with the growing items,
            # which are read once and compared with every query at once (an exact scan per query in SQL is
            # tens of times slower); a merge that changes the segments meanwhile changes no answer
            segments = sealed_segments(conn, bank.id)
            found = [[] for _ in range(len(queries))]
            if segments:
                branches = [nearest(index_order, version_range(s.lo, s.hi)) for s in segments]
                statement = template.format(
                    sql.SQL("SELECT * FROM ({}) s ORDER BY distance, id LIMIT %(k)s").format(
                        sql.SQL(" UNION ALL ").join(sql.SQL("({})").format(b) for b in branches)
                    )
                )
                found = _group(conn.cursor(row_factory=dict_row).execute(statement, params).fetchall(), len(queries))
            growing = _growing_nearest(conn, bank, queries, k, labels, unsealed(segments), with_meta)
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


def _growing_nearest(
    conn: psycopg.Connection,
    bank: Bank,
    queries: np.ndarray,
    k: int,
    labels: list[int] | None,
    where: sql.Composable,
    with_meta: bool,
) -> list[list[_Hit]]:
    """The k nearest growing items (those matching `where`) of each query, exactly, computed here."""
    conditions = sql.SQL("bank_id = {} AND {}{}").format(
        sql.Literal(int(bank.id)), where, sql.SQL(" AND label = ANY(%s)") if labels is not None else sql.SQL("")
    )
    params = [labels] if labels is not None else []
    rows = conn.execute(
        sql.SQL("SELECT id, label FROM {} WHERE {} ORDER BY id").format(items_partition(bank.id), conditions),
        params,
    ).fetchall()
    if not rows:
        return [[] for _ in range(len(queries))]
    select_keys = sql.SQL("SELECT key FROM {} WHERE {} ORDER BY id").format(items_partition(bank.id), conditions)
    keys = np.concatenate(list(iter_vectors(conn, select_keys, params, bank.dim))).astype(np.float64)
    if len(keys) != len(rows):
        raise RuntimeError("the growing items changed within one snapshot")
    nearest = min(k, len(rows))
    part = np.empty((len(queries), nearest), dtype=np.int64)
    ranked = np.empty((len(queries), nearest), dtype=np.float64)
    block = max(1, _DISTANCE_BLOCK // len(rows))  # queries at a time: the matrix stays tens of MB
    for start in range(0, len(queries), block):
        chunk = distances(bank.metric, queries[start : start + block], keys)
        order_by = np.where(np.isnan(chunk), np.inf, chunk)  # pgvector sorts NaN last
        chosen = np.argpartition(order_by, nearest - 1, axis=1)[:, :nearest]
        part[start : start + block] = chosen
        ranked[start : start + block] = np.take_along_axis(chunk, chosen, axis=1)
    metas: dict[int, Any] = {}
    if with_meta:
        wanted = sorted({rows[j][0] for j in part.ravel().tolist()})
        metas = dict(
            conn.execute(
                sql.SQL("SELECT id, meta FROM {} WHERE id = ANY(%s)").format(items_partition(bank.id)), (wanted,)
            ).fetchall()
        )
    found = []
    for i, columns in enumerate(part):
        hits = [
            _Hit(rows[j][0], rows[j][1], float(ranked[i, n]), metas.get(rows[j][0]))
            for n, j in enumerate(columns.tolist())
        ]
        found.append(sorted(hits, key=_rank))
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
