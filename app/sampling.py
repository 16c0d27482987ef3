"""Block samples of a large layer, so the dashboard's aggregates answer in well under a second.

A layer of a million rows x 128 units is about 600 MB: reading it whole for one unit's
histogram takes seconds. Above a row budget an aggregate reads a block sample instead
(`TABLESAMPLE SYSTEM`: whole pages, chosen at random with a fixed seed, so the same layer
gives the same answer on every refresh), and its answer says that it is sampled, at what
percent, and how many rows matched. Rows arrive in step order, so a block sample keeps
every part of the run in proportion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from app.database import one_row
from app.runs import Layer, layer_partition

T = TypeVar("T")
SEED = 0  # REPEATABLE: the same pages on every call while the layer is unchanged


@dataclass(frozen=True)
class Sample:
    """What an aggregate reads: every row of the layer (percent None) or a block sample of it."""

    layer_rows: int  # rows stored in the layer, from the ingest ledger
    percent: float | None  # of the layer's pages read; None: all of them

    @property
    def sampled(self) -> bool:
        return self.percent is not None

    def fields(self) -> dict[str, Any]:
        """What an answer says about what it read (the fields of `app.schemas.SampleOut`)."""
        return {"sampled": self.sampled, "sample_percent": self.percent, "layer_rows": self.layer_rows}


def stored_rows(conn: psycopg.Connection, layer: Layer) -> int:
    """Rows stored in the layer, from the ingest ledger (no scan of the rows themselves)."""
    return int(
        one_row(
            conn.execute(
                "SELECT coalesce(sum(row_count), 0) FROM ingest_batches WHERE run_id = %s AND layer_id = %s",
                (layer.run_id, layer.id),
            )
        )[0]
    )


def choose(conn: psycopg.Connection, layer: Layer, budget: int | None) -> Sample:
    """Every row when the layer holds at most `budget` of them (or no budget is given), else about `budget`."""
    rows = stored_rows(conn, layer)
    if budget is None or rows <= budget:
        return Sample(layer_rows=rows, percent=None)
    return Sample(layer_rows=rows, percent=round(100.0 * budget / rows, 6))


def rows_of(layer: Layer, sample: Sample | None) -> sql.Composable:
    """The FROM item of the layer's rows (alias `a`): all of them, or the chosen block sample."""
    partition = layer_partition(layer.run_id, layer.id)
    if sample is None or sample.percent is None:
        return sql.SQL("{} a").format(partition)
    return sql.SQL("{} a TABLESAMPLE SYSTEM ({}) REPEATABLE ({})").format(
        partition, sql.Literal(sample.percent), sql.Literal(SEED)
    )


def answer(sample: Sample, compute: Callable[[Sample], T], rows: Callable[[T], int]) -> tuple[T, Sample]:
    """`compute` over the sample; over every row instead when the sample matched none (a narrow
    filter can miss every sampled page), so an empty answer always means no row matches."""
    found = compute(sample)
    if sample.sampled and rows(found) == 0:
        sample = Sample(layer_rows=sample.layer_rows, percent=None)
        found = compute(sample)
    return found, sample
