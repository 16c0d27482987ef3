"""Islands of agreement in a GLOM state, and the parse tree they form.

An island is a connected group of locations of one image and one level whose
neighbouring embeddings agree: two locations are joined when they are neighbours
(4-neighbourhood by default: up, down, left, right; 8 adds the diagonals) and the
cosine of their embeddings is at least `threshold`. Neighbourhoods do not wrap here,
even when the network's attention does: a part is a spatial region, and the two edges
of an image are not next to each other.

All images and levels are labelled at once: one sparse graph over every (sample,
level, location) node, scipy's connected components on it, and per-island statistics
by bincount and ufunc.at. The result is a columnar `IslandTable` (numpy arrays, ready
to be written into a memory bank per level) with `rows()` for plain dataclasses.

Each island's parent is the island of the next level up that covers most of its
locations (ties: the lower id); top-level islands have none. Following parents from
the bottom gives the image's parse tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["IslandRow", "IslandTable", "ParseNode", "find_islands", "parse_tree", "render_tree", "unpack_mask"]

NO_PARENT = -1
NO_LABEL = -1


@dataclass(frozen=True)
class IslandRow:
    """One island. `bbox` is (top, left, bottom, right), bottom and right exclusive; `mask` the island's locations
    over the whole grid as packed bits (numpy.packbits order, row-major), see `unpack_mask`."""

    island: int
    sample: int
    level: int
    iteration: int
    centroid: np.ndarray  # (D,) float32, the members' mean embedding, L2-normalised
    size: int
    bbox: tuple[int, int, int, int]
    mask: bytes
    parent: int  # island id at level + 1, or -1
    label: int | None


@dataclass(frozen=True)
class IslandTable:
    """Islands as columns (K rows); ids are row indices, and `parent` refers to them."""

    sample: np.ndarray  # (K,) int64
    level: np.ndarray  # (K,) int64
    iteration: np.ndarray  # (K,) int64
    centroid: np.ndarray  # (K, D) float32, L2-normalised
    size: np.ndarray  # (K,) int64
    bbox: np.ndarray  # (K, 4) int64: top, left, bottom, right (exclusive)
    mask: np.ndarray  # (K, ceil(H * W / 8)) uint8 packed bits over the grid
    parent: np.ndarray  # (K,) int64, -1 at the top level
    label: np.ndarray  # (K,) int64, -1 where unknown
    grid: tuple[int, int]  # (H, W) of the column grid
    location_island: np.ndarray  # (B, L', H, W) int64: the island of every location (L' = the levels asked for)
    levels: tuple[int, ...]  # the levels labelled, in the order of location_island's second axis

    def __len__(self) -> int:
        return int(self.size.shape[0])

    def row(self, island: int) -> IslandRow:
        label = int(self.label[island])
        return IslandRow(
            island=island,
            sample=int(self.sample[island]),
            level=int(self.level[island]),
            iteration=int(self.iteration[island]),
            centroid=self.centroid[island],
            size=int(self.size[island]),
            bbox=tuple(int(v) for v in self.bbox[island]),  # type: ignore[arg-type]
            mask=self.mask[island].tobytes(),
            parent=int(self.parent[island]),
            label=None if label == NO_LABEL else label,
        )

    def rows(self) -> list[IslandRow]:
        return [self.row(i) for i in range(len(self))]

    def of(self, *, sample: int | None = None, level: int | None = None) -> np.ndarray:
        """Ids of the islands of a sample and/or level."""
        keep = np.ones(len(self), dtype=bool)
        if sample is not None:
            keep &= self.sample == sample
        if level is not None:
            keep &= self.level == level
        return np.flatnonzero(keep)


def unpack_mask(mask: bytes | np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A packed island mask back to an (H, W) bool array."""
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8) if isinstance(mask, bytes) else mask)
    return bits[: grid[0] * grid[1]].reshape(grid).astype(bool)


def _unit(x: np.ndarray, axis: int) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def find_islands(
    state: np.ndarray,
    *,
    threshold: float = 0.9,
    connectivity: Literal[4, 8] = 4,
    levels: tuple[int, ...] | None = None,
    iteration: int = -1,
    labels: np.ndarray | None = None,
) -> IslandTable:
    """The islands of every image and level of a GLOM state (B, L, D, H, W) (numpy, or anything np.asarray takes:
    pass `tensor.detach().cpu().numpy()`). `levels` limits the levels labelled (default: all); parents link
    consecutive levels among them. `iteration` is recorded on every row; `labels` (B,) the samples' classes."""
    state = np.asarray(state, dtype=np.float32)
    if state.ndim != 5:
        raise ValueError(f"state must be (B, L, D, H, W), not {state.shape}")
    if connectivity not in (4, 8):
        raise ValueError("connectivity is 4 or 8")
    chosen = tuple(range(state.shape[1])) if levels is None else tuple(levels)
    state = state[:, list(chosen)]
    batch, n_levels, dim, height, width = state.shape
    unit = _unit(state, axis=2)
    node = np.arange(batch * n_levels * height * width).reshape(batch, n_levels, height, width)

    # Edges between agreeing neighbours, one direction per pair (the graph is treated as undirected).
    steps = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
    sources, targets = [], []
    for dy, dx in steps:
        ys = slice(0, height - dy)
        a_x = slice(max(0, -dx), width - max(0, dx))
        b_x = slice(max(0, dx), width - max(0, -dx))
        a, b = unit[..., ys, a_x], unit[..., dy:, b_x]
        agree = (a * b).sum(axis=2) >= threshold  # (B, L, h', w')
        sources.append(node[..., ys, a_x][agree])
        targets.append(node[..., dy:, b_x][agree])
    source, target = np.concatenate(sources), np.concatenate(targets)
    graph = coo_matrix((np.ones(len(source), dtype=np.int8), (source, target)), shape=(node.size, node.size))
    _, component = connected_components(graph, directed=False)

    # Number islands in (sample, level, first location) order so ids are stable and grouped.
    first_seen = np.full(component.max() + 1, node.size, dtype=np.int64)
    np.minimum.at(first_seen, component, np.arange(node.size))
    order = np.argsort(first_seen, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    island = rank[component]  # (N,) island of every node
    n_islands = len(order)

    flat_nodes = np.arange(node.size)
    samples, level_pos, ys_, xs_ = np.unravel_index(flat_nodes, node.shape)
    size = np.bincount(island, minlength=n_islands)
    vectors = np.moveaxis(state, 2, -1).reshape(-1, dim)  # (N, D) in node order
    centroid = np.zeros((n_islands, dim), dtype=np.float64)
    np.add.at(centroid, island, vectors)
    centroid = _unit(centroid / size[:, None], axis=1).astype(np.float32)

    bbox = np.empty((n_islands, 4), dtype=np.int64)
    bbox[:, 0] = bbox[:, 1] = np.iinfo(np.int64).max
    bbox[:, 2] = bbox[:, 3] = -1
    np.minimum.at(bbox[:, 0], island, ys_)
    np.minimum.at(bbox[:, 1], island, xs_)
    np.maximum.at(bbox[:, 2], island, ys_ + 1)
    np.maximum.at(bbox[:, 3], island, xs_ + 1)

    cell = ys_ * width + xs_
    mask = np.zeros((n_islands, (height * width + 7) // 8), dtype=np.uint8)
    np.bitwise_or.at(mask, (island, cell // 8), (1 << (7 - cell % 8)).astype(np.uint8))

    island_sample = np.zeros(n_islands, dtype=np.int64)
    island_sample[island] = samples
    island_level_pos = np.zeros(n_islands, dtype=np.int64)
    island_level_pos[island] = level_pos

    location_island = island.reshape(batch, n_levels, height, width)
    parent = np.full(n_islands, NO_PARENT, dtype=np.int64)
    if n_levels > 1:
        child = location_island[:, :-1].ravel()
        above = location_island[:, 1:].ravel()
        pairs, counts = np.unique(np.stack([child, above]), axis=1, return_counts=True)
        # Per child: the parent with most shared locations, the lower id on a tie.
        best = np.lexsort((pairs[1], -counts, pairs[0]))
        pairs = pairs[:, best]
        first = np.r_[True, pairs[0, 1:] != pairs[0, :-1]]
        parent[pairs[0, first]] = pairs[1, first]

    label = np.full(n_islands, NO_LABEL, dtype=np.int64)
    if labels is not None:
        label = np.asarray(labels, dtype=np.int64)[island_sample]

    return IslandTable(
        sample=island_sample,
        level=np.asarray(chosen, dtype=np.int64)[island_level_pos],
        iteration=np.full(n_islands, iteration, dtype=np.int64),
        centroid=centroid,
        size=size.astype(np.int64),
        bbox=bbox,
        mask=mask,
        parent=parent,
        label=label,
        grid=(height, width),
        location_island=location_island,
        levels=chosen,
    )


@dataclass
class ParseNode:
    island: IslandRow
    children: list[ParseNode] = field(default_factory=list)


def parse_tree(table: IslandTable, sample: int) -> list[ParseNode]:
    """The parse tree of one image: its top-level islands (largest first), each with the islands below whose parent
    it is, recursively (children largest first)."""
    ids = table.of(sample=sample)
    nodes = {int(i): ParseNode(table.row(int(i))) for i in ids}
    roots: list[ParseNode] = []
    for i in ids[np.argsort(-table.size[ids], kind="stable")]:
        node = nodes[int(i)]
        parent = node.island.parent
        (nodes[parent].children if parent != NO_PARENT else roots).append(node)
    return roots


def render_tree(roots: list[ParseNode], indent: str = "  ") -> str:
    """A parse tree as indented text: one line per island with its level, size and bounding box."""
    lines: list[str] = []

    def walk(node: ParseNode, depth: int) -> None:
        row = node.island
        lines.append(f"{indent * depth}island {row.island} level {row.level} size {row.size} bbox {row.bbox}")
        for child in node.children:
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return "\n".join(lines)
