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
from app.banks import Bank, GrowingCache, items_partition, search
from app.banks.schema import run_banks
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
    conn: psycopg.Connection,
    project_id: int,
    run_id: int,
    island_set: str,
    sample: int,
    level: int,
    k: int,
    *,
    exact: bool = False,
    ef_search: int = 100,
    growing_cache: GrowingCache | None = None,
) -> list[IslandNeighbours]:
    """For each island of the image at `level`, the k most similar islands of other images at that level: through
    the bank's HNSW index (`ef_search`), or an exact scan (ties by item id) when `exact`.

    The bank search is asked for k plus the image's own islands at the level (the most it can have to drop), so
    leaving them out never makes an answer short: each has min(k, islands of other images) neighbours."""
    chosen = [b for b in _set_banks(conn, project_id, run_id, island_set) if b.level == level]
    if not chosen:
        raise NotFound(f"island set {island_set!r} of run {run_id} has no level {level}", field="level")
    bank = chosen[0].bank
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        statement = sql.SQL("SELECT id, label, meta, key FROM {} WHERE meta @> %s ORDER BY id").format(
            items_partition(bank.id)
        )
        own = conn.cursor(row_factory=dict_row).execute(statement, (_of_sample(sample),)).fetchall()
        if not own:
            raise NotFound(f"no islands of sample {sample} at level {level}", field="sample")
        queries = np.stack([row["key"].to_numpy() for row in own]).astype(np.float32)
        found = search(
            conn,
            bank,
            queries,
            k + len(own),
            exact=exact,
            ef_search=ef_search,
            labels=None,
            with_meta=True,
            growing_cache=growing_cache,
        )
    answers = []
    for row, hits in zip(own, found):
        island = Island(row["id"], bank.id, level, row["label"], row["meta"])
        metas = hits.metas or [None] * len(hits.ids)
        neighbours = [
            Neighbour(item_id, score, label, meta)
            for item_id, score, label, meta in zip(hits.ids, hits.scores, hits.labels, metas)
            if not (meta is not None and meta.get("sample") == sample)
        ]
        answers.append(IslandNeighbours(island, neighbours[:k]))
    return answers
