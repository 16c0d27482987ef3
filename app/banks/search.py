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
from eidetic.errors import DimensionMismatch
from eidetic.wire.vectors import require_comparable

MAX_EF_SEARCH = 1000  # pgvector's limit
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
    if exact:
        statement = exact_statement
    elif bank.segmented:
        # each sealed segment through its own partial index, the growing items exactly, merged by distance
        # (a merge that changes the segments meanwhile changes no answer: each branch is a WHERE clause)
        segments = sealed_segments(conn, bank.id)
        branches = [nearest(index_order, version_range(s.lo, s.hi)) for s in segments]
        branches.append(nearest(scan_order, unsealed(segments)))
        statement = template.format(
            sql.SQL("SELECT * FROM ({}) s ORDER BY distance, id LIMIT %(k)s").format(
                sql.SQL(" UNION ALL ").join(sql.SQL("({})").format(b) for b in branches)
            )
        )
    else:
        statement = template.format(nearest(index_order))
    vectors = [Vector(query) for query in queries]
    params: dict[str, Any] = {"queries": vectors, "labels": labels, "k": k}
    with conn.transaction():
        if not exact:
            conn.execute(
                sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(min(max(ef_search, k), MAX_EF_SEARCH)))
            )
            if labels is not None:
                conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
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
