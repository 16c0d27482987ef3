"""How GLOM's islands live in memory banks: one bank per run, island set and level, found by name.

An island set (e.g. the training images' islands of one network) is stored level by
level in banks named `island_bank_name(run_id, island_set, level)`. Each item's key is
the island's normalised centroid, its label the image's class, and its meta holds the
rest of the island's row under the names in `IslandMeta`; `parent` is the item id of
the island one level up (item ids are unique across banks), so parse trees survive
the trip into the store. The service and the clients both read the names from here.
"""

from __future__ import annotations

import re
from typing import TypedDict

__all__ = ["ISLAND_SET_PATTERN", "IslandMeta", "island_bank_name", "island_bank_prefix", "parse_island_bank_name"]

ISLAND_SET_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_NAME = re.compile(r"^run-(?P<run>[0-9]+)/islands/(?P<set>[A-Za-z0-9_.-]{1,64})/level-(?P<level>[0-9]+)$")


class IslandMeta(TypedDict):
    """An island item's meta: its image, level, iteration, id within its table, size, bounding box (top, left,
    bottom, right; exclusive), mask (base64 of the packed bits over the grid), grid (H, W) and parent item id."""

    sample: int
    level: int
    iteration: int
    island: int
    size: int
    bbox: list[int]
    mask: str
    grid: list[int]
    parent: int | None


def island_bank_prefix(run_id: int, island_set: str) -> str:
    return f"run-{int(run_id)}/islands/{island_set}/level-"


def island_bank_name(run_id: int, island_set: str, level: int) -> str:
    """The bank of one level of a run's island set."""
    if not re.match(ISLAND_SET_PATTERN, island_set):
        raise ValueError(f"an island set is named by 1 to 64 of A-Z a-z 0-9 _ . -, not {island_set!r}")
    return f"{island_bank_prefix(run_id, island_set)}{int(level)}"


def parse_island_bank_name(name: str) -> tuple[int, str, int] | None:
    """(run id, island set, level) of an island bank's name, or None for any other bank."""
    found = _NAME.match(name)
    if found is None:
        return None
    return int(found["run"]), found["set"], int(found["level"])
