"""Aggregates for the dashboard and for curl: distributions and histograms of a unit, store
statistics, and a bank's items, neighbours and projection. Only summaries leave the database."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, Request

from app import aggregates, banks, runs, sampling
from app.deps import Conn, Id, Reader
from app.routers.activations import Where
from app.schemas import (
    BankFillOut,
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
from app.settings import Settings

router = APIRouter(tags=["aggregates"])

Unit = Annotated[int, Query(ge=0, le=15_999, description="The unit (0-based index into the layer's vectors).")]
LAYER = "/v1/runs/{run_id}/layers/{layer_id}"
BANK = "/v1/memory-banks/{bank_id}"


Sampled = Annotated[
    bool,
    Query(
        description="Read a block sample of about `aggregate_sample_rows` rows (a setting) when the layer holds "
        "more, and say so in the answer; false reads every selected row."
    ),
]


def chosen_sample(request: Request, conn: Conn, layer: runs.Layer, sample: bool) -> sampling.Sample:
    settings: Settings = request.app.state.settings
    return sampling.choose(conn, layer, settings.aggregate_sample_rows if sample else None)


@router.get(f"{LAYER}/distribution", response_model=DistributionOut)
def distribution(
    request: Request,
    run_id: Id,
    layer_id: Id,
    unit: Unit,
    where: Where,
    principal: Reader,
    conn: Conn,
    buckets: Annotated[int, Query(ge=1, le=1000, description="Equal-width step buckets.")] = 50,
    sample: Sampled = True,
) -> DistributionOut:
    """Percentile bands of one unit over step buckets (like TensorBoard's distributions)."""
    layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
    found, read = sampling.answer(
        chosen_sample(request, conn, layer, sample),
        lambda chosen: aggregates.distribution(conn, layer, unit, buckets, where, chosen),
        lambda found: sum(bucket.rows for bucket in found),
    )
    return DistributionOut(
        unit=unit,
        percentiles=list(aggregates.BAND_PERCENTILES),
        buckets=[StepBucketOut(**asdict(bucket)) for bucket in found],
        **read.fields(),
    )


@router.get(f"{LAYER}/histogram", response_model=HistogramOut)
def histogram(
    request: Request,
    run_id: Id,
    layer_id: Id,
    unit: Unit,
    where: Where,
    principal: Reader,
    conn: Conn,
    bins: Annotated[int, Query(ge=1, le=1000)] = 50,
    sample: Sampled = True,
) -> HistogramOut:
    """A histogram of one unit over the selected rows (step range, task, label, epoch)."""
    layer = runs.get_layer(conn, principal.project_id, run_id, layer_id)
    found, read = sampling.answer(
        chosen_sample(request, conn, layer, sample),
        lambda chosen: aggregates.histogram(conn, layer, unit, bins, where, chosen),
        lambda found: found.rows,
    )
    return HistogramOut(unit=unit, **asdict(found), **read.fields())


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


@router.get(f"{BANK}/fill", response_model=BankFillOut)
def bank_fill(
    bank_id: Id,
    principal: Reader,
    conn: Conn,
    points: Annotated[
        int, Query(ge=1, le=2000, description="Equal-width version buckets: at most this many changes come back.")
    ] = 200,
) -> BankFillOut:
    """The bank's size over time: its size after each change, for at most `points` changes (one per version bucket)."""
    bank = banks.get_bank(conn, principal.project_id, bank_id)
    return BankFillOut(**asdict(aggregates.bank_fill(conn, bank, points)))


@router.get(f"{BANK}/projection", response_model=ProjectionOut)
def projection(
    bank_id: Id,
    principal: Reader,
    conn: Conn,
    sample: Annotated[int, Query(ge=2, le=20_000, description="Keys drawn at random for the projection.")] = 2000,
) -> ProjectionOut:
    """The keys' first two principal components, over a uniform sample (any bank size)."""
    bank = banks.get_bank(conn, principal.project_id, bank_id)
    return ProjectionOut(**asdict(aggregates.projection(conn, bank, sample)))
