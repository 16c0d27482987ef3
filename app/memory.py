"""Memory banks: stored keys (and optional values) searched by nearest neighbour, written under a policy.

Writes lock the bank's row, so the replacement policy, the capacity and the version
hold under any number of concurrent writers; every change bumps the bank version in
the same transaction, which makes `since=version` a complete change feed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import psycopg
from pgvector import Vector
from psycopg import sql

from app.copy_binary import iter_vectors
from eidetic.errors import Conflict, DimensionMismatch, InvalidInput, NonFiniteValue, NotFound
from eidetic.wire.vectors import as_float32, require_comparable, require_finite

METRICS = ("cosine", "l2", "ip")
POLICIES = ("none", "fifo", "same_class_lowest_similarity", "least_confident")
_DISTANCE = {"cosine": "<=>", "l2": "<->", "ip": "<#>"}
_OPCLASS = {"cosine": "vector_cosine_ops", "l2": "vector_l2_ops", "ip": "vector_ip_ops"}
MAX_EF_SEARCH = 1000  # pgvector's limit


@dataclass(frozen=True)
class Bank:
    id: int
    project_id: int
    name: str
    dim: int
    value_dim: int | None
    metric: str
    capacity: int
    policy: str
    similarity_threshold: float
    version: int
    size: int
    created_at: datetime
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64


_BANK_COLUMNS = (
    "id, project_id, name, dim, value_dim, metric, capacity, policy, similarity_threshold, version, size, created_at, "
    "hnsw_m, hnsw_ef_construction"
)


def items_partition(bank_id: int) -> sql.Identifier:
    return sql.Identifier(f"memory_items_b{int(bank_id)}")


# ------------------------------------------------------------------ similarity


def similarity_from_distance(metric: str, distance: np.ndarray) -> np.ndarray:
    """Higher is more similar: cosine similarity, inner product, or 1/(1+L2 distance).

    A zero key stored before zero vectors were refused is at distance NaN under cosine;
    its similarity is 0 (as in `similarities`), never a NaN in an answer.
    """
    if metric == "cosine":
        return np.where(np.isnan(distance), 0.0, 1.0 - distance)
    if metric == "ip":
        return -distance
    return 1.0 / (1.0 + distance)


def similarities(metric: str, keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Similarity of one query to every key, with the same definition as the SQL path."""
    if metric == "cosine":
        norms = np.linalg.norm(keys, axis=1) * np.linalg.norm(query)
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = (keys @ query) / norms
        return np.where(norms > 0, cosine, 0.0)  # pgvector: a zero vector is at distance 1 (NaN)
    if metric == "ip":
        return keys @ query
    return 1.0 / (1.0 + np.linalg.norm(keys - query, axis=1))


# ------------------------------------------------------------------ banks


def create_bank(
    conn: psycopg.Connection,
    project_id: int,
    name: str,
    dim: int,
    metric: str,
    capacity: int,
    policy: str,
    similarity_threshold: float,
    value_dim: int | None = None,
    hnsw_m: int = 16,
    hnsw_ef_construction: int = 64,
) -> Bank:
    """A bank and its partition, with an HNSW index (m, ef_construction) on its keys."""
    with conn.transaction():
        row = conn.execute(
            f"INSERT INTO memory_banks (project_id, name, dim, value_dim, metric, capacity, policy, "
            f"similarity_threshold, hnsw_m, hnsw_ef_construction) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            f"ON CONFLICT (project_id, name) DO NOTHING RETURNING {_BANK_COLUMNS}",
            (
                project_id,
                name,
                dim,
                value_dim,
                metric,
                capacity,
                policy,
                similarity_threshold,
                hnsw_m,
                hnsw_ef_construction,
            ),
        ).fetchone()
        if row is None:
            raise Conflict(f"a memory bank named {name!r} already exists in this project", field="name")
        bank = Bank(*row)
        partition = items_partition(bank.id)
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF memory_items FOR VALUES IN ({})").format(
                partition, sql.Literal(bank.id)
            )
        )
        conn.execute(
            sql.SQL(
                "CREATE INDEX {} ON {} USING hnsw ((key::vector({})) {}) WITH (m = {}, ef_construction = {})"
            ).format(
                sql.Identifier(f"memory_items_b{bank.id}_hnsw"),
                partition,
                sql.Literal(bank.dim),
                sql.SQL(_OPCLASS[metric]),
                sql.Literal(bank.hnsw_m),
                sql.Literal(bank.hnsw_ef_construction),
            )
        )
    return bank


def get_bank(conn: psycopg.Connection, project_id: int, bank_id: int, *, lock: bool = False) -> Bank:
    """A bank of the caller's project; another project's bank is not found."""
    row = conn.execute(
        f"SELECT {_BANK_COLUMNS} FROM memory_banks WHERE id = %s AND project_id = %s" + (" FOR UPDATE" if lock else ""),
        (bank_id, project_id),
    ).fetchone()
    if row is None:
        raise NotFound(f"memory bank {bank_id} not found", field="bank_id")
    return Bank(*row)


def list_banks(conn: psycopg.Connection, project_id: int) -> list[Bank]:
    rows = conn.execute(f"SELECT {_BANK_COLUMNS} FROM memory_banks WHERE project_id = %s ORDER BY id", (project_id,))
    return [Bank(*row) for row in rows.fetchall()]


def delete_bank(conn: psycopg.Connection, project_id: int, bank_id: int) -> None:
    with conn.transaction():
        get_bank(conn, project_id, bank_id, lock=True)
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(items_partition(bank_id)))
        conn.execute("DELETE FROM memory_banks WHERE id = %s", (bank_id,))


# ------------------------------------------------------------------ writes


@dataclass
class NewItems:
    """A batch of items to write: keys (n x dim), labels, optional values and confidences."""

    keys: np.ndarray
    labels: list[int | None]
    values: list[np.ndarray | None]
    confidences: list[float | None]

    def check(self, bank: Bank) -> None:
        if self.keys.ndim != 2 or len(self.keys) == 0:
            raise InvalidInput("items need at least one key", field="items")
        if self.keys.shape[1] != bank.dim:
            raise DimensionMismatch(
                f"bank {bank.name!r} has dimension {bank.dim}, the keys have {self.keys.shape[1]}", field="items[0].key"
            )
        require_comparable(self.keys, bank.metric, "items[{}].key")
        for i, value in enumerate(self.values):
            if value is None:
                continue
            if bank.value_dim is None:
                raise InvalidInput(f"bank {bank.name!r} stores no values", field=f"items[{i}].value")
            if len(value) != bank.value_dim:
                raise DimensionMismatch(
                    f"values of bank {bank.name!r} have {bank.value_dim} entries, not {len(value)}",
                    field=f"items[{i}].value",
                )
            require_finite(as_float32(value)[None, :], f"items[{i}].value")
        for i, confidence in enumerate(self.confidences):
            if confidence is not None and not np.isfinite(confidence):
                raise NonFiniteValue("confidence must be finite", field=f"items[{i}].confidence")


@dataclass(frozen=True)
class WriteResult:
    inserted: int
    replaced: int
    skipped: int
    version: int
    ids: list[int | None] = field(default_factory=list)


@dataclass
class _BankState:
    """The bank's items in memory while its row is locked: enough to apply a policy exactly."""

    ids: list[int | None]
    keys: np.ndarray
    labels: np.ndarray  # int64, with NULL as a sentinel that matches no label
    confidences: np.ndarray  # float64, NULL as -inf (least confident first)
    inserted_order: np.ndarray  # int64: older first


_NO_LABEL = np.iinfo(np.int64).min


def _load_state(conn: psycopg.Connection, bank: Bank) -> _BankState:
    partition = items_partition(bank.id)
    rows = conn.execute(
        sql.SQL("SELECT id, label, confidence, inserted_version, inserted_rank FROM {} ORDER BY id").format(partition)
    ).fetchall()
    keys = np.empty((len(rows), bank.dim), dtype=np.float32)
    filled = 0
    for chunk in iter_vectors(conn, sql.SQL("SELECT key FROM {} ORDER BY id").format(partition), [], bank.dim):
        keys[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    return _BankState(
        ids=[row[0] for row in rows],
        keys=keys,
        labels=np.array([_NO_LABEL if row[1] is None else row[1] for row in rows], dtype=np.int64),
        confidences=np.array([-np.inf if row[2] is None else row[2] for row in rows], dtype=np.float64),
        inserted_order=np.array([(row[3] << 32) + row[4] for row in rows], dtype=np.int64),
    )


def write_items(
    conn: psycopg.Connection, project_id: int, bank_id: int, items: NewItems, timeout_ms: int | None = None
) -> WriteResult:
    """Applies the bank's policy to each item in order, atomically, under the bank's row lock.

    Insert while not full. When full, an item is stored only if it is novel (its best
    similarity is under the threshold) and then replaces, per policy, the lowest-similarity
    item of its class (else overall), the least confident item, or the oldest (fifo).
    """
    with conn.transaction():
        if timeout_ms is not None:  # inserts into a live HNSW index are slow: a large write needs longer
            conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(int(timeout_ms))))
        bank = get_bank(conn, project_id, bank_id, lock=True)
        items.check(bank)
        version = bank.version + 1
        size = bank.size
        state: _BankState | None = None
        inserts: list[int] = []  # positions of items to insert
        replacements: dict[int, int] = {}  # stored id -> position of the item replacing it
        outcome: list[int | None] = [None] * len(items.keys)  # stored id, or -1 - k for the k-th insert
        skipped = 0
        for position in range(len(items.keys)):
            if size < bank.capacity:
                outcome[position] = -1 - len(inserts)
                inserts.append(position)
                size += 1
                continue
            if bank.policy == "none":
                skipped += 1
                continue
            if state is None:
                state = _load_state(conn, bank)
                _append(state, items, inserts, version)
            key = items.keys[position]
            sims = similarities(bank.metric, state.keys, key)
            if sims.max() >= bank.similarity_threshold:
                skipped += 1
                continue
            victim = _victim(bank.policy, state, sims, items.labels[position])
            victim_id = state.ids[victim]
            _overwrite(state, victim, items, position, version)
            if victim_id < 0:  # an insert of this same batch: it is replaced before it is stored
                inserts[-1 - victim_id] = position
                outcome = [None if o == victim_id else o for o in outcome]
                outcome[position] = victim_id
            else:
                replacements[victim_id] = position
                outcome = [None if o == victim_id else o for o in outcome]
                outcome[position] = victim_id
        replaced_and_kept = len(replacements)
        skipped = len(items.keys) - len(inserts) - replaced_and_kept
        if not inserts and not replacements:
            return WriteResult(0, 0, skipped, bank.version, [None] * len(items.keys))
        new_ids = _insert(conn, bank, items, inserts, version)
        _replace(conn, bank, items, replacements, version)
        conn.execute(
            "UPDATE memory_banks SET version = %s, size = %s WHERE id = %s",
            (version, bank.size + len(inserts), bank.id),
        )
    ids = [None if o is None else (new_ids[-1 - o] if o < 0 else o) for o in outcome]
    return WriteResult(len(inserts), replaced_and_kept, skipped, version, ids)


def _victim(policy: str, state: _BankState, sims: np.ndarray, label: int | None) -> int:
    if policy == "same_class_lowest_similarity":
        same = state.labels == (_NO_LABEL if label is None else label)
        if same.any():
            candidates = np.flatnonzero(same)
            return int(candidates[np.argmin(sims[candidates])])
        return int(np.argmin(sims))
    if policy == "least_confident":
        return int(np.lexsort((state.inserted_order, state.confidences))[0])
    return int(np.argmin(state.inserted_order))  # fifo: the oldest


def _append(state: _BankState, items: NewItems, positions: list[int], version: int) -> None:
    """Adds this batch's pending inserts (ids -1, -2, ...) to the loaded state, in one go."""
    state.ids.extend(-1 - k for k in range(len(positions)))
    state.keys = np.concatenate([state.keys, items.keys[positions]])
    labels = [_NO_LABEL if items.labels[p] is None else items.labels[p] for p in positions]
    confidences = [-np.inf if items.confidences[p] is None else items.confidences[p] for p in positions]
    state.labels = np.concatenate([state.labels, np.array(labels, dtype=np.int64)])
    state.confidences = np.concatenate([state.confidences, np.array(confidences, dtype=np.float64)])
    order = version * (1 << 32) + np.array(positions, dtype=np.int64)
    state.inserted_order = np.concatenate([state.inserted_order, order])


def _overwrite(state: _BankState, index: int, items: NewItems, position: int, version: int) -> None:
    state.keys[index] = items.keys[position]
    label = items.labels[position]
    state.labels[index] = _NO_LABEL if label is None else label
    confidence = items.confidences[position]
    state.confidences[index] = -np.inf if confidence is None else confidence
    state.inserted_order[index] = version * (1 << 32) + position


def _vector(value) -> Vector | None:
    return None if value is None else Vector(np.asarray(value, dtype=np.float32))


def _insert(conn: psycopg.Connection, bank: Bank, items: NewItems, positions: list[int], version: int) -> list[int]:
    if not positions:
        return []
    partition = items_partition(bank.id)
    first = conn.execute(
        "SELECT nextval(pg_get_serial_sequence('memory_items', 'id')) FROM generate_series(1, %s)", (len(positions),)
    ).fetchall()
    ids = [row[0] for row in first]
    statement = sql.SQL(
        "COPY {} (bank_id, id, key, label, value, confidence, version, inserted_version, inserted_rank) "
        "FROM STDIN (FORMAT BINARY)"
    ).format(partition)
    with conn.cursor().copy(statement) as copy:
        copy.set_types(["bigint", "bigint", "vector", "integer", "vector", "real", "bigint", "bigint", "integer"])
        for item_id, position in zip(ids, positions):
            copy.write_row(
                (
                    bank.id,
                    item_id,
                    Vector(items.keys[position]),
                    items.labels[position],
                    _vector(items.values[position]),
                    items.confidences[position],
                    version,
                    version,
                    position,
                )
            )
    return ids


def _replace(conn: psycopg.Connection, bank: Bank, items: NewItems, replacements: dict[int, int], version: int) -> None:
    if not replacements:
        return
    statement = sql.SQL(
        "UPDATE {} SET key = %s, label = %s, value = %s, confidence = %s, version = %s, "
        "inserted_version = %s, inserted_rank = %s WHERE id = %s"
    ).format(items_partition(bank.id))
    conn.execute(
        "DELETE FROM memory_hits WHERE bank_id = %s AND item_id = ANY(%s)", (bank.id, list(replacements))
    )  # a replaced item starts afresh
    with conn.cursor() as cursor:
        cursor.executemany(
            statement,
            [
                (
                    Vector(items.keys[p]),
                    items.labels[p],
                    _vector(items.values[p]),
                    items.confidences[p],
                    version,
                    version,
                    p,
                    item_id,
                )
                for item_id, p in replacements.items()
            ],
        )


def delete_item(conn: psycopg.Connection, project_id: int, bank_id: int, item_id: int) -> int:
    """Removes one item, leaving a tombstone at the new version; returns that version."""
    with conn.transaction():
        bank = get_bank(conn, project_id, bank_id, lock=True)
        deleted = conn.execute(
            sql.SQL("DELETE FROM {} WHERE id = %s RETURNING id").format(items_partition(bank.id)), (item_id,)
        ).fetchone()
        if deleted is None:
            raise NotFound(f"item {item_id} not found in bank {bank_id}", field="item_id")
        version = bank.version + 1
        conn.execute(
            "INSERT INTO memory_tombstones (bank_id, item_id, version) VALUES (%s, %s, %s)", (bank.id, item_id, version)
        )
        conn.execute("DELETE FROM memory_hits WHERE bank_id = %s AND item_id = %s", (bank.id, item_id))
        conn.execute("UPDATE memory_banks SET version = %s, size = size - 1 WHERE id = %s", (version, bank.id))
    return version


# ------------------------------------------------------------------ search


@dataclass(frozen=True)
class Neighbours:
    """The k nearest items of one query, most similar first, and their similarity-weighted vote."""

    ids: list[int]
    scores: list[float]
    labels: list[int | None]
    prediction: int | None
    confidence: float


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


def search(
    conn: psycopg.Connection,
    bank: Bank,
    queries: np.ndarray,
    k: int,
    *,
    exact: bool,
    ef_search: int,
    labels: list[int] | None,
) -> list[Neighbours]:
    """Batched k-nearest-neighbour search: one statement for the whole batch of queries.

    The HNSW path raises ef_search to at least k (HNSW returns at most ef_search rows),
    uses iterative index scans under a label filter, and falls back to an exact scan for
    any query that still came back short, so every answer has min(k, matching items) rows.
    """
    if queries.ndim != 2 or queries.shape[1] != bank.dim:
        raise DimensionMismatch(f"bank {bank.name!r} has dimension {bank.dim}", field="queries")
    require_comparable(queries, bank.metric, "queries[{}]")
    partition = items_partition(bank.id)
    operator = sql.SQL(_DISTANCE[bank.metric])
    typed_key = sql.SQL("key::vector({})").format(sql.Literal(bank.dim))
    typed_query = sql.SQL("q.v::vector({})").format(sql.Literal(bank.dim))
    label_filter = sql.SQL("WHERE label = ANY(%s)") if labels is not None else sql.SQL("")
    # The exact statement orders by an expression no index matches ("+ 0"), so it scans
    # every item whatever plan psycopg's prepared-statement cache holds; the HNSW one
    # orders by the indexed expression itself.
    template = (
        "SELECT q.ord, m.id, m.label, m.distance FROM unnest(%b::vector[]) WITH ORDINALITY q(v, ord) "
        "CROSS JOIN LATERAL (SELECT id, label, {key} {op} {query} AS distance FROM {items} {filter} "
        "ORDER BY {order} LIMIT %s) m ORDER BY q.ord, m.distance, m.id"
    )
    index_order = sql.SQL("{} {} {}").format(typed_key, operator, typed_query)
    scan_order = sql.SQL("({} {} {}) + 0, id").format(typed_key, operator, typed_query)
    parts = {"key": typed_key, "op": operator, "query": typed_query, "items": partition, "filter": label_filter}
    statement = sql.SQL(template).format(order=scan_order if exact else index_order, **parts)
    exact_statement = sql.SQL(template).format(order=scan_order, **parts)
    vectors = [Vector(query) for query in queries]
    params = [vectors, *([labels] if labels is not None else []), k]
    with conn.transaction():
        if not exact:
            conn.execute(
                sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(min(max(ef_search, k), MAX_EF_SEARCH)))
            )
            if labels is not None:
                conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
        rows = conn.execute(statement, params).fetchall()
        found = _group(rows, len(queries))
        if not exact:
            came_short = [i for i, hits in enumerate(found) if len(hits) < k]
            matching = _matching_count(conn, bank, labels) if came_short else k  # a look-up only when needed
            short = [i for i in came_short if len(found[i]) < min(k, matching)]
            if short:  # the index came back short (filters, tiny ef_search): answer these exactly
                retry = conn.execute(exact_statement, [[vectors[i] for i in short], *params[1:]]).fetchall()
                for i, hits in zip(short, _group(retry, len(short))):
                    found[i] = hits
    answers = []
    for hits in found:
        scores = similarity_from_distance(bank.metric, np.array([h[2] for h in hits], dtype=np.float64)).tolist()
        item_labels = [h[1] for h in hits]
        prediction, confidence = vote(scores, item_labels, k)
        answers.append(Neighbours([h[0] for h in hits], scores, item_labels, prediction, confidence))
    return answers


def _group(rows: list[tuple], n_queries: int) -> list[list[tuple]]:
    grouped: list[list[tuple]] = [[] for _ in range(n_queries)]
    for ordinal, item_id, label, distance in rows:
        grouped[ordinal - 1].append((item_id, label, float(distance)))
    return grouped


def _matching_count(conn: psycopg.Connection, bank: Bank, labels: list[int] | None) -> int:
    if labels is None:
        return conn.execute("SELECT size FROM memory_banks WHERE id = %s", (bank.id,)).fetchone()[0]
    statement = sql.SQL("SELECT count(*) FROM {} WHERE label = ANY(%s)").format(items_partition(bank.id))
    return conn.execute(statement, (labels,)).fetchone()[0]


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


# ------------------------------------------------------------------ change feed and snapshot


@dataclass(frozen=True)
class Changes:
    items: list[dict]
    tombstones: list[dict]
    version: int
    next_since: int | None


def changes(conn: psycopg.Connection, project_id: int, bank_id: int, since: int, limit: int) -> Changes:
    """Items written and tombstones left after `since`, whole versions at a time, in version order.

    A page ends at a version boundary (unless one version alone holds more than `limit`
    items), so a cache that applies a page and asks again from `next_since` misses nothing.
    """
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        bank = get_bank(conn, project_id, bank_id)
        partition = items_partition(bank.id)
        rows = conn.execute(
            sql.SQL(
                "SELECT id, key, label, value, confidence, version, inserted_rank FROM {} WHERE version > %s "
                "ORDER BY version, id LIMIT %s"
            ).format(partition),
            (since, limit + 1),
        ).fetchall()
        upto = bank.version
        next_since = None
        if len(rows) > limit:
            last_version = rows[limit][5]
            upto = last_version - 1 if last_version > rows[0][5] else last_version
            if upto == last_version:  # one version larger than a page: send it whole
                rows = conn.execute(
                    sql.SQL(
                        "SELECT id, key, label, value, confidence, version, inserted_rank FROM {} WHERE version = %s "
                        "ORDER BY id"
                    ).format(partition),
                    (upto,),
                ).fetchall()
            else:
                rows = [row for row in rows if row[5] <= upto]
            next_since = upto if upto < bank.version else None
        tombstones = conn.execute(
            "SELECT item_id, version FROM memory_tombstones WHERE bank_id = %s AND version > %s AND version <= %s "
            "ORDER BY version, item_id",
            (bank.id, since, upto),
        ).fetchall()
    items = [
        {
            "id": row[0],
            "key": _as_array(row[1]).tolist(),
            "label": row[2],
            "value": None if row[3] is None else _as_array(row[3]).tolist(),
            "confidence": row[4],
            "version": row[5],
            "rank": row[6],
        }
        for row in rows
    ]
    return Changes(items, [{"id": t[0], "version": t[1]} for t in tombstones], upto, next_since)


def _as_array(value) -> np.ndarray:
    return value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value, dtype=np.float32)


def snapshot_rows(conn: psycopg.Connection, bank: Bank, chunk_rows: int = 8192):
    """The bank's items in id order, a chunk at a time (call inside a repeatable-read transaction)."""
    statement = sql.SQL(
        "SELECT m.id, m.key, m.label, m.value, m.confidence, coalesce(h.hits, 0), m.version, m.inserted_rank "
        "FROM {} m LEFT JOIN memory_hits h ON h.bank_id = m.bank_id AND h.item_id = m.id ORDER BY m.id"
    ).format(items_partition(bank.id))
    with conn.cursor(name="eidetic_snapshot") as cursor:
        cursor.itersize = chunk_rows
        cursor.execute(statement)
        while True:
            rows = cursor.fetchmany(chunk_rows)
            if not rows:
                return
            yield [(r[0], _as_array(r[1]), r[2], None if r[3] is None else _as_array(r[3]), *r[4:]) for r in rows]
