"""GLOM's islands in the store: the island banks of a run, an image's parse tree, and parts that look alike.

Islands are memory items in banks named by `eidetic.wire.islands` (one bank per run,
island set and level); their meta carries the image (`sample`), the island's row and the
item id of its `parent` one level up. Everything here reads those banks; writing them is
an ordinary item write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from app import runs
from app.banks import Bank, items_partition, similarity_from_distance
from app.banks.schema import run_banks
from app.banks.search import DISTANCE_OPERATORS
from eidetic.errors import NotFound
from eidetic.wire.islands import island_bank_prefix, parse_island_bank_name


@dataclass(frozen=True)
class IslandBank:
    island_set: str
    level: int
    bank: Bank


@dataclass(frozen=True)
class Island:
    """One stored island: its item id, bank, level, label (the image's class) and meta (the island's row)."""

    id: int
    bank_id: int
    level: int
    label: int | None
    meta: dict[str, Any]
    children: list[Island] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.meta.get("size", 0))


@dataclass(frozen=True)
class Neighbour:
    id: int
    score: float
    label: int | None
    meta: dict[str, Any] | None


@dataclass(frozen=True)
class IslandNeighbours:
    """One island of the image and the most similar islands of other images at its level, most similar first."""

    island: Island
    neighbours: list[Neighbour]


def island_banks(conn: psycopg.Connection, project_id: int, run_id: int) -> list[IslandBank]:
    """The island banks of a run of the caller's project, by island set then level."""
    runs.get_run(conn, project_id, run_id)
    found = []
    for bank in run_banks(conn, project_id, run_id):
        parsed = parse_island_bank_name(bank.name)
        assert parsed is not None  # a run's banks are its island banks
        found.append(IslandBank(parsed[1], parsed[2], bank))
    return sorted(found, key=lambda b: (b.island_set, b.level))


def _set_banks(conn: psycopg.Connection, project_id: int, run_id: int, island_set: str) -> list[IslandBank]:
    chosen = [b for b in island_banks(conn, project_id, run_id) if b.island_set == island_set]
    if not chosen:
        raise NotFound(
            f"run {run_id} has no island set {island_set!r} (banks named {island_bank_prefix(run_id, island_set)}N)",
            field="island_set",
        )
    return chosen


def _of_sample(sample: int) -> Jsonb:
    return Jsonb({"sample": sample})


def island_tree(conn: psycopg.Connection, project_id: int, run_id: int, island_set: str, sample: int) -> list[Island]:
    """The parse tree of one image: its top islands (largest first, then by id), each with the islands whose
    parent it is, recursively, ordered the same way. Read from one snapshot of every level's bank."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        nodes: dict[int, Island] = {}
        for level_bank in _set_banks(conn, project_id, run_id, island_set):
            statement = sql.SQL("SELECT id, label, meta FROM {} WHERE meta @> %s ORDER BY id").format(
                items_partition(level_bank.bank.id)
            )
            for row in conn.cursor(row_factory=dict_row).execute(statement, (_of_sample(sample),)):
                nodes[row["id"]] = Island(row["id"], level_bank.bank.id, level_bank.level, row["label"], row["meta"])
    if not nodes:
        raise NotFound(f"island set {island_set!r} of run {run_id} has no islands of sample {sample}", field="sample")
    roots: list[Island] = []
    for node in sorted(nodes.values(), key=lambda n: (-n.size, n.id)):
        parent_id = node.meta.get("parent")
        parent = nodes.get(parent_id) if isinstance(parent_id, int) else None
        (parent.children if parent is not None else roots).append(node)
    return roots


def nearest_islands(
    conn: psycopg.Connection, project_id: int, run_id: int, island_set: str, sample: int, level: int, k: int
) -> list[IslandNeighbours]:
    """For each island of the image at `level`, the k most similar islands of other images at that level
    (an exact scan of the level's bank, ties by item id)."""
    chosen = [b for b in _set_banks(conn, project_id, run_id, island_set) if b.level == level]
    if not chosen:
        raise NotFound(f"island set {island_set!r} of run {run_id} has no level {level}", field="level")
    bank = chosen[0].bank
    distance = sql.SQL("(o.key::vector({dim}) {op} q.key::vector({dim}))").format(
        dim=sql.Literal(bank.dim), op=sql.SQL(DISTANCE_OPERATORS[bank.metric])
    )
    statement = sql.SQL(
        "SELECT q.id AS query_id, q.label AS query_label, q.meta AS query_meta, m.id, m.label, m.meta, m.distance "
        "FROM {items} q LEFT JOIN LATERAL (SELECT o.id, o.label, o.meta, {distance} AS distance FROM {items} o "
        "WHERE NOT coalesce(o.meta @> %(sample)s, false) ORDER BY {distance} + 0, o.id LIMIT %(k)s) m ON true "
        "WHERE q.meta @> %(sample)s ORDER BY q.id, m.distance, m.id"
    ).format(items=items_partition(bank.id), distance=distance)
    rows = conn.cursor(row_factory=dict_row).execute(statement, {"sample": _of_sample(sample), "k": k}).fetchall()
    if not rows:
        raise NotFound(f"no islands of sample {sample} at level {level}", field="sample")
    answers: dict[int, IslandNeighbours] = {}
    for row in rows:
        query = answers.get(row["query_id"])
        if query is None:
            island = Island(row["query_id"], bank.id, level, row["query_label"], row["query_meta"])
            query = answers[row["query_id"]] = IslandNeighbours(island, [])
        if row["id"] is not None:  # an image alone at its level has no neighbours
            score = float(similarity_from_distance(bank.metric, np.array([row["distance"]], dtype=np.float64))[0])
            query.neighbours.append(Neighbour(row["id"], score, row["label"], row["meta"]))
    return list(answers.values())
