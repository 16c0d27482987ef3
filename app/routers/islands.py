"""GLOM's islands of a run: their banks, the parse tree of an image, and the islands of other images most alike."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from app import islands
from app.banks import MAX_EF_SEARCH
from app.deps import Conn, Id, Reader
from app.schemas import (
    IslandBankList,
    IslandBankOut,
    IslandNeighbourOut,
    IslandNeighboursOut,
    IslandNodeOut,
    IslandOut,
    IslandSearchOut,
    IslandTreeOut,
)
from app.settings import Settings
from eidetic.errors import InvalidInput
from eidetic.wire.islands import ISLAND_SET_PATTERN

router = APIRouter(prefix="/v1/runs/{run_id}/islands", tags=["islands"])

IslandSet = Annotated[str, Path(pattern=ISLAND_SET_PATTERN, description="e.g. glom-train")]
Sample = Annotated[int, Path(ge=0, le=2**63 - 1, description="The image's sample id in the island set.")]


def island_out(island: islands.Island) -> IslandOut:
    return IslandOut(id=island.id, bank_id=island.bank_id, level=island.level, label=island.label, meta=island.meta)


def node_out(island: islands.Island) -> IslandNodeOut:
    return IslandNodeOut(**island_out(island).model_dump(), children=[node_out(child) for child in island.children])


@router.get("", response_model=IslandBankList)
def island_banks(run_id: Id, principal: Reader, conn: Conn) -> IslandBankList:
    """The run's island banks: one per island set and level."""
    found = islands.island_banks(conn, principal.project_id, run_id)
    banks = [IslandBankOut(island_set=b.island_set, level=b.level, bank_id=b.bank.id, size=b.bank.size) for b in found]
    return IslandBankList(banks=banks)


@router.get("/{island_set}/{sample}/tree", response_model=IslandTreeOut)
def island_tree(run_id: Id, island_set: IslandSet, sample: Sample, principal: Reader, conn: Conn) -> IslandTreeOut:
    """The parse tree of one image: its top islands, each with the islands below whose parent it is."""
    roots = islands.island_tree(conn, principal.project_id, run_id, island_set, sample)
    return IslandTreeOut(run_id=run_id, island_set=island_set, sample=sample, roots=[node_out(r) for r in roots])


@router.get("/{island_set}/{sample}/neighbours", response_model=IslandSearchOut)
def nearest_islands(
    request: Request,
    run_id: Id,
    island_set: IslandSet,
    sample: Sample,
    principal: Reader,
    conn: Conn,
    level: Annotated[int, Query(ge=0, le=10_000, description="The level whose islands are compared.")],
    k: Annotated[int, Query(ge=1, description="Neighbours per island.")] = 5,
    exact: Annotated[bool, Query(description="An exact scan of the level's bank instead of its HNSW index.")] = False,
    ef_search: Annotated[int, Query(ge=1, le=MAX_EF_SEARCH, description="HNSW candidate list size.")] = 100,
) -> IslandSearchOut:
    """Parts that look alike: for each island of the image at `level`, the k most similar islands of other
    images at that level (through the bank's HNSW index, or an exact scan with `exact=true`)."""
    settings: Settings = request.app.state.settings
    if k > settings.max_search_k:
        raise InvalidInput(f"k is at most {settings.max_search_k}", field="k")
    found = islands.nearest_islands(
        conn,
        principal.project_id,
        run_id,
        island_set,
        sample,
        level,
        k,
        exact=exact,
        ef_search=ef_search,
        growing_cache=request.app.state.growing_cache,
    )
    results = [
        IslandNeighboursOut(
            island=island_out(answer.island),
            neighbours=[
                IslandNeighbourOut(id=n.id, score=n.score, label=n.label, meta=n.meta) for n in answer.neighbours
            ],
        )
        for answer in found
    ]
    return IslandSearchOut(run_id=run_id, island_set=island_set, sample=sample, level=level, results=results)
