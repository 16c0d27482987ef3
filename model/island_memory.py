"""Where GLOM's islands are kept for search: the store's island banks (USE_DB) or memory, with one kNN vote.

`StoredIslands` writes an `IslandTable` into one memory bank per level through
`eidetic.EideticClient` (keys: the normalised centroids; labels: the images' classes;
meta: the rest of each row, with `parent` mapped from island ids to item ids, so the
service can walk parse trees). `LocalIslands` keeps the same rows in numpy. Both answer
`predictions(level, queries, k)`: per query island, the similarity-weighted vote of its k
nearest stored islands (exact cosine; the store's exact search), so an experiment gets
the same class votes with USE_DB on or off. `island_vote` turns the top-level islands'
votes into one class per image.

Equal votes need equal scores, ties included: islands of one class often have centroids
equal to the last float bit, where pgvector's float32 sums and numpy's would round apart
and pick different neighbours. So keys and queries are put on a grid (`grid_keys`:
multiples of 2^-b, b chosen from the dimension) on which every dot product and norm is
exact in float32: pgvector's cosine distance, 1 - dot / sqrt(|a|^2 |b|^2) in float64,
then equals numpy's bit for bit, and both break ties by item order. The grid moves a
unit vector by at most sqrt(D) 2^-(b+1) (0.0015 at D = 10).
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from eidetic.client import EideticClient
from eidetic.torch.memory_cache import MemoryCache
from eidetic.wire.islands import IslandMeta, island_bank_name
from eidetic.wire.meta import encode_meta
from model.islands import NO_LABEL, NO_PARENT, IslandTable

__all__ = [
    "IslandMemory",
    "LocalIslands",
    "StoredIslands",
    "grid_keys",
    "island_meta",
    "island_vote",
    "storage_per_image",
]

WRITE_CHUNK = 2000  # items per write request
SEARCH_CHUNK = 1024  # queries per search request


def grid_keys(vectors: np.ndarray) -> np.ndarray:
    """Unit vectors rounded to multiples of 2^-b (float32), with b the largest for which D products of two
    components sum exactly in float32 (D * 2^2b <= 2^24), so every cosine of two of them is computed exactly."""
    vectors = np.asarray(vectors, dtype=np.float64)
    bits = (24 - math.ceil(math.log2(max(vectors.shape[-1], 2)))) // 2
    scale = float(2**bits)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return (np.round(unit * scale) / scale).astype(np.float32)


def island_meta(table: IslandTable, island: int, parent: int | None) -> IslandMeta:
    """The meta of one island's item: its row, with `parent` the parent's item id (or None at the top)."""
    return {
        "sample": int(table.sample[island]),
        "level": int(table.level[island]),
        "iteration": int(table.iteration[island]),
        "island": island,
        "size": int(table.size[island]),
        "bbox": [int(v) for v in table.bbox[island]],
        "mask": base64.b64encode(table.mask[island].tobytes()).decode("ascii"),
        "grid": [int(v) for v in table.grid],
        "parent": parent,
    }


class IslandMemory(Protocol):
    """Island rows kept per level, searched by their centroids."""

    def add(self, table: IslandTable) -> None: ...

    def predictions(self, level: int, queries: np.ndarray, k: int) -> np.ndarray: ...

    def latencies(self, level: int, queries: np.ndarray, k: int) -> dict[str, float]: ...


class LocalIslands:
    """The islands in memory: per level, their unit centroids and labels, searched by exact cosine (numpy)."""

    def __init__(self) -> None:
        self.keys: dict[int, np.ndarray] = {}
        self.labels: dict[int, np.ndarray] = {}

    def add(self, table: IslandTable) -> None:
        for level in np.unique(table.level).tolist():
            ids = table.of(level=level)
            keys = grid_keys(table.centroid[ids])
            self.keys[level] = np.concatenate([self.keys.get(level, keys[:0]), keys])
            self.labels[level] = np.concatenate([self.labels.get(level, table.label[:0]), table.label[ids]])

    def predictions(self, level: int, queries: np.ndarray, k: int) -> np.ndarray:
        """The store's exact search and vote, computed here as the service does: the k smallest cosine distances
        (ties: the earlier stored), then each label's sum of max(similarity, 0) in neighbour order, the largest
        winning (ties: the lower label); -1 where no neighbour has a label."""
        keys, labels = self.keys[level].astype(np.float64), self.labels[level]
        asked = grid_keys(queries).astype(np.float64)
        norms = np.sqrt((asked**2).sum(axis=1)[:, None] * (keys**2).sum(axis=1)[None, :])
        distance = 1.0 - np.clip((asked @ keys.T) / norms, -1.0, 1.0)  # exact on the grid, as pgvector's
        top = np.argsort(distance, axis=1, kind="stable")[:, : min(k, len(keys))]
        scores, neighbour_labels = 1.0 - np.take_along_axis(distance, top, axis=1), labels[top]
        n_classes = max(int(labels.max(initial=0)) + 1, 1)
        weights = np.zeros((len(asked), n_classes))
        present = np.zeros((len(asked), n_classes), dtype=bool)
        for j in range(top.shape[1]):  # neighbour by neighbour, so each label's sum adds up as the service's does
            rows = np.flatnonzero(neighbour_labels[:, j] != NO_LABEL)
            weights[rows, neighbour_labels[rows, j]] += np.maximum(scores[rows, j], 0.0)
            present[rows, neighbour_labels[rows, j]] = True
        prediction = np.where(present, weights, -np.inf).argmax(axis=1)
        return np.where(present.any(axis=1), prediction, -1)

    def latencies(self, level: int, queries: np.ndarray, k: int) -> dict[str, float]:
        return {"memory_exact": _ms_per_query(lambda: self.predictions(level, queries, k), len(queries))}


class StoredIslands:
    """The islands in the store: one bank per level, named by `island_bank_name(run_id, island_set, level)`."""

    def __init__(self, client: EideticClient, run_id: int, island_set: str) -> None:
        self.client = client
        self.run_id = run_id
        self.island_set = island_set
        self.bank_ids: dict[int, int] = {}

    def add(self, table: IslandTable) -> None:
        """Creates each level's bank (capacity: its islands) and writes them top level first, each level in island
        order, so a parent's item id is known when its children are written."""
        item_of = np.full(len(table), NO_PARENT, dtype=np.int64)
        for level in sorted(np.unique(table.level).tolist(), reverse=True):
            ids = table.of(level=level)
            name = island_bank_name(self.run_id, self.island_set, level)
            bank = self.client.create_bank(
                name, int(table.centroid.shape[1]), max(len(ids), 1), metric="cosine", policy="none"
            )
            self.bank_ids[level] = int(bank["id"])
            for start in range(0, len(ids), WRITE_CHUNK):
                chunk = ids[start : start + WRITE_CHUNK]
                items = [self._item(table, int(i), item_of) for i in chunk]
                written = self.client.write_items(self.bank_ids[level], items)
                if written["skipped"]:
                    raise RuntimeError(f"the bank {name!r} skipped {written['skipped']} islands")
                item_of[chunk] = written["ids"]

    @staticmethod
    def _item(table: IslandTable, island: int, item_of: np.ndarray) -> dict:
        parent = int(table.parent[island])
        label = int(table.label[island])
        return {
            "key": grid_keys(table.centroid[island][None])[0],  # numpy keys: an Arrow body
            "label": None if label == NO_LABEL else label,
            "meta": dict(island_meta(table, island, None if parent == NO_PARENT else int(item_of[parent]))),
        }

    def predictions(self, level: int, queries: np.ndarray, k: int, *, exact: bool = True) -> np.ndarray:
        """The service's search (exact by default) and vote of each query, -1 where no neighbour had a label."""
        found: list[int] = []
        asked = grid_keys(queries)
        for start in range(0, len(asked), SEARCH_CHUNK):
            results = self.client.search(self.bank_ids[level], asked[start : start + SEARCH_CHUNK], k, exact=exact)
            found.extend(-1 if r["prediction"] is None else int(r["prediction"]) for r in results)
        return np.asarray(found, dtype=np.int64)

    def latencies(self, level: int, queries: np.ndarray, k: int) -> dict[str, float]:
        """Milliseconds per query island: the service's exact and HNSW search, and the device cache
        (`eidetic.torch.MemoryCache`, warmed from the bank's snapshot)."""
        cache = MemoryCache.from_service(self.client, self.bank_ids[level])
        tensor = torch.from_numpy(grid_keys(queries))
        return {
            "service_exact": _ms_per_query(lambda: self.predictions(level, queries, k), len(queries)),
            "service_hnsw": _ms_per_query(lambda: self.predictions(level, queries, k, exact=False), len(queries)),
            "device_cache": _ms_per_query(lambda: cache.search(tensor, k), len(queries)),
        }


def island_vote(table: IslandTable, predictions: np.ndarray, n_samples: int, n_classes: int) -> np.ndarray:
    """Per image, the class its top-level islands vote for, each with its size as weight (ties: the lower class);
    -1 for an image none of whose islands had a vote. `predictions` holds one class per top-level island of
    `table`, in island order."""
    top = table.of(level=max(table.levels))
    voted = predictions >= 0
    tallies = np.zeros((n_samples, n_classes), dtype=np.int64)
    np.add.at(tallies, (table.sample[top][voted], predictions[voted]), table.size[top][voted])
    winner = tallies.argmax(axis=1)
    winner[tallies.sum(axis=1) == 0] = -1
    return winner


def storage_per_image(table: IslandTable, n_images: int, dim: int) -> dict[str, object]:
    """Island rows and bytes per image against the column vectors they summarise.

    An island row's bytes: its float32 key, its meta as compact JSON (parent written as an island id, so the count
    does not depend on where the rows went), an 8-byte id and a 4-byte label; the database's own overhead and
    indexes are not counted. A column vector's: its float32 embedding, one per location and level.
    """
    meta_bytes = sum(
        len(encode_meta(dict(island_meta(table, i, None if p == NO_PARENT else int(p)))).encode())
        for i, p in enumerate(table.parent.tolist())
    )
    row_bytes = len(table) * (4 * dim + 8 + 4) + meta_bytes
    height, width = table.grid
    columns = len(table.levels) * height * width
    return {
        "rows_per_image": len(table) / n_images,
        "rows_per_image_by_level": (np.bincount(table.level, minlength=max(table.levels) + 1) / n_images).tolist(),
        "bytes_per_image": row_bytes / n_images,
        "column_vectors_per_image": columns,
        "column_bytes_per_image": columns * dim * 4,
    }


def _ms_per_query(search: Callable[[], object], n: int) -> float:
    started = time.perf_counter()
    search()
    return 1000.0 * (time.perf_counter() - started) / max(n, 1)
