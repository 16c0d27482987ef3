"""Islands: connected regions of agreeing embeddings per image and level, their rows and the parse tree."""

from __future__ import annotations

import numpy as np
import pytest

from model.islands import find_islands, parse_tree, render_tree, unpack_mask

LEFT, RIGHT, OTHER = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])


def state_of(*levels: np.ndarray) -> np.ndarray:
    """(1, L, D, H, W) from per-level (H, W, D) embedding grids."""
    return np.stack([np.moveaxis(level, -1, 0) for level in levels])[None].astype(np.float32)


def two_halves(height: int = 4, width: int = 6, split: int = 2) -> np.ndarray:
    grid = np.empty((height, width, 3))
    grid[:, :split] = LEFT
    grid[:, split:] = RIGHT
    return grid


def test_two_uniform_regions_make_exactly_two_islands_with_their_sizes_and_boxes() -> None:
    table = find_islands(state_of(two_halves()), threshold=0.9, iteration=7, labels=np.array([3]))
    assert len(table) == 2
    left, right = table.rows()
    assert (left.size, left.bbox) == (8, (0, 0, 4, 2))
    assert (right.size, right.bbox) == (16, (0, 2, 4, 6))
    assert np.allclose(left.centroid, LEFT) and np.allclose(right.centroid, RIGHT)
    assert unpack_mask(left.mask, table.grid)[:, :2].all() and not unpack_mask(left.mask, table.grid)[:, 2:].any()
    assert {row.iteration for row in table.rows()} == {7} and {row.label for row in table.rows()} == {3}
    assert {row.parent for row in table.rows()} == {-1}
    assert table.location_island.shape == (1, 1, 4, 6)


def test_scaled_embeddings_agree_and_the_centroid_is_normalised() -> None:
    grid = np.ones((2, 2, 3)) * np.array([1.0, 1.0, 0.0])
    grid[0, 0] *= 10.0  # same direction, ten times longer: cosine 1
    (island,) = find_islands(state_of(grid), threshold=0.99).rows()
    assert island.size == 4
    assert np.isclose(np.linalg.norm(island.centroid), 1.0)


def test_neighbours_below_the_threshold_stay_apart() -> None:
    grid = two_halves()
    grid[:, 2:] = 0.8 * LEFT + 0.6 * RIGHT  # cosine 0.8 with LEFT
    assert len(find_islands(state_of(grid), threshold=0.9)) == 2
    assert len(find_islands(state_of(grid), threshold=0.75)) == 1


def test_agreeing_embeddings_across_the_image_edge_are_not_joined() -> None:
    grid = np.empty((3, 5, 3))
    grid[:] = OTHER
    grid[:, 0] = grid[:, -1] = LEFT  # the first and last columns agree, and would touch on a torus
    table = find_islands(state_of(grid), threshold=0.9)
    assert sorted(row.bbox for row in table.rows() if np.allclose(row.centroid, LEFT)) == [(0, 0, 3, 1), (0, 4, 3, 5)]
    assert len(table) == 3


def test_diagonal_neighbours_join_only_with_8_connectivity() -> None:
    grid = np.empty((2, 2, 3))
    grid[:] = OTHER
    grid[0, 0] = grid[1, 1] = LEFT
    assert len(find_islands(state_of(grid), threshold=0.9, connectivity=4)) == 4
    assert len(find_islands(state_of(grid), threshold=0.9, connectivity=8)) == 2  # both diagonals join


def test_each_island_points_to_the_island_above_covering_most_of_it() -> None:
    parts = np.empty((4, 6, 3))
    parts[:, :2], parts[:, 2:4], parts[:, 4:] = LEFT, RIGHT, OTHER
    wholes = two_halves(split=3)  # the middle part straddles both wholes, one column in each
    table = find_islands(state_of(parts, wholes), threshold=0.9)
    by_box = {(row.level, row.bbox): row for row in table.rows()}
    whole_left, whole_right = by_box[(1, (0, 0, 4, 3))], by_box[(1, (0, 3, 4, 6))]
    assert by_box[(0, (0, 0, 4, 2))].parent == whole_left.island
    assert by_box[(0, (0, 4, 4, 6))].parent == whole_right.island
    assert by_box[(0, (0, 2, 4, 4))].parent == whole_left.island  # a 4-4 tie goes to the lower id
    assert whole_left.parent == whole_right.parent == -1


def test_the_parse_tree_of_one_image_links_its_islands_by_parent() -> None:
    parts = np.empty((4, 6, 3))
    parts[:, :2], parts[:, 2:] = LEFT, RIGHT
    whole = np.ones((4, 6, 3)) * OTHER
    first = state_of(parts, whole)
    second = state_of(whole, whole)
    table = find_islands(np.concatenate([first, second]), threshold=0.9)
    (root,) = parse_tree(table, sample=0)
    assert root.island.level == 1 and root.island.size == 24
    assert [child.island.size for child in root.children] == [16, 8]  # largest first
    assert all(child.island.sample == 0 for child in root.children)
    assert "level 0 size 8 bbox (0, 0, 4, 2)" in render_tree([root])
    (other_root,) = parse_tree(table, sample=1)
    assert len(other_root.children) == 1


def test_islands_of_a_glom_state_cover_every_location_once() -> None:
    torch = pytest.importorskip("torch")
    from model.glom import Glom, GlomConfig

    model = Glom(GlomConfig(levels=3, iterations=2, hidden=8)).eval()
    with torch.no_grad():
        state = model(torch.randn(2, 1, 5, 5)).state
    table = find_islands(state.numpy(), threshold=0.95, levels=(1, 2), iteration=2)
    assert table.size.sum() == 2 * 2 * 5 * 5
    assert set(table.level.tolist()) <= {1, 2}
    assert (table.parent[table.level == 2] == -1).all() and (table.parent[table.level == 1] >= 0).all()
    assert np.allclose(np.linalg.norm(table.centroid, axis=1), 1.0, atol=1e-5)
