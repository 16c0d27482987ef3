"""Aggregates for the dashboard and for curl: distributions and histograms of a unit, store
statistics, and a bank's items, neighbours and projection. Only summaries leave the database."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query

from app import aggregates, banks, runs
from app.deps import Conn, Id, Reader
from app.routers.activations import Where
from app.schemas import (
    BankItemOut,
    BankItemsOut,
    DistributionOut,
    HistogramOut,
    LabelCountOut,
    NeighboursOut,
    ProjectionOut,
    RunStatsOut,
    StatsOut,
    StepBucketOut,
)

router = APIRouter(tags=["aggregates"])

Unit = Annotated[int, Query(ge=0, le=15_999, description="The unit (0-based index into the layer's vectors).")]
LAYER = "/v1/runs/{run_id}/layers/{layer_id}"
BANK = "/v1/memory-banks/{bank_id}"


@router.get(f"{LAYER}/distribution", response_model=DistributionOut)
def distribution(
    run_id: Id,
    layer_id: Id,
    unit: Unit,
    where: Where,
    principal: Reader,
    conn: Conn,
    buckets: Annotated[int, Query(ge=1, le=1000, description="Equal-width step buckets.")] = 50,
) -> DistributionOut:
    """Percentile bands of one unit over step buckets (like TensorBoard's distributions)."""
    layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
    found = aggregates.distribution(conn, layer, unit, buckets, where)
    return DistributionOut(
        unit=unit,
        percentiles=list(aggregates.BAND_PERCENTILES),
        buckets=[StepBucketOut(**asdict(bucket)) for bucket in found],
    )


@router.get(f"{LAYER}/histogram", response_model=HistogramOut)
def histogram(
    run_id: Id,
    layer_id: Id,
    unit: Unit,
    where: Where,
    principal: Reader,
    conn: Conn,
    bins: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> HistogramOut:
    """A histogram of one unit over the selected rows (step range, task, label, epoch)."""
    layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
    return HistogramOut(unit=unit, **asdict(aggregates.histogram(conn, layer, unit, bins, where)))


@router.get("/v1/stats", response_model=StatsOut)
def stats(principal: Reader, conn: Conn) -> StatsOut:
    """Every run of the caller's project: layers, rows stored, bytes on disk, rows ingested in the last minute."""
    return StatsOut(runs=[RunStatsOut(**asdict(run)) for run in aggregates.run_stats(conn, principal.project_id)])


@router.get(f"{BANK}/items", response_model=BankItemsOut)
def bank_items(
    bank_id: Id,
    principal: Reader,
    conn: Conn,
    label: Annotated[int | None, Query(ge=-(2**31), le=2**31 - 1)] = None,
    after_id: Annotated[int, Query(ge=0, le=2**63 - 1, description="The last id of the previous page.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> BankItemsOut:
    """The bank's items in id order (keys left out), with their confidence and hits, and items per label."""
    bank = banks.get_bank(conn, principal.project_id, bank_id)
    items, labels = aggregates.bank_items(conn, bank, label, after_id, limit)
    return BankItemsOut(
        items=[BankItemOut(**asdict(item)) for item in items],
        labels=[LabelCountOut(**asdict(count)) for count in labels],
        next_after_id=items[-1].id if len(items) == limit else None,
    )


@router.get(f"{BANK}/items/{{item_id}}/neighbours", response_model=NeighboursOut)
def item_neighbours(
    bank_id: Id, item_id: Id, principal: Reader, conn: Conn, k: Annotated[int, Query(ge=1, le=100)] = 10
) -> NeighboursOut:
    """The k items nearest to a stored item (exact, itself left out); reading them counts no hits."""
    bank = banks.get_bank(conn, principal.project_id, bank_id)
    return NeighboursOut(**asdict(aggregates.item_neighbours(conn, bank, item_id, k)))


@router.get(f"{BANK}/projection", response_model=ProjectionOut)
def projection(
    bank_id: Id,
    principal: Reader,
    conn: Conn,
    sample: Annotated[int, Query(ge=2, le=20_000, description="Keys sampled uniformly for the projection.")] = 2000,
) -> ProjectionOut:
    """The keys' first two principal components, over a uniform sample (any bank size)."""
    bank = banks.get_bank(conn, principal.project_id, bank_id)
    return ProjectionOut(**asdict(aggregates.projection(conn, bank, sample)))
