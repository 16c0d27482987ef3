"""Request and response bodies of the REST API (v1)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Name = Field(min_length=1, max_length=200, pattern=r"^[^\x00]+$")


class RunCreate(BaseModel):
    name: str = Name
    config: dict[str, Any] = Field(default_factory=dict)


class RunUpdate(BaseModel):
    status: Literal["running", "finished", "failed"]


class RunOut(BaseModel):
    id: int
    name: str
    config: dict[str, Any]
    status: str
    created_at: datetime


class RunList(BaseModel):
    runs: list[RunOut]


class LayerCreate(BaseModel):
    name: str = Name
    dim: int = Field(ge=1, le=16_000, description="Units per activation vector (pgvector's limit is 16,000).")
    kind: str = Field(default="activations", min_length=1, max_length=50, pattern=r"^[A-Za-z0-9_.-]+$")
    sketch: bool = Field(default=True, description="Keep per-unit quantile sketches up to date on ingest.")


class LayerOut(BaseModel):
    id: int
    run_id: int
    name: str
    dim: int
    kind: str
    created_at: datetime
    sketch: bool


class LayerList(BaseModel):
    layers: list[LayerOut]


class ActivationRowIn(BaseModel):
    """One row of the JSON ingest format (documentation; bulk clients send Arrow)."""

    values: list[float]
    sample_id: int | None = None
    step: int | None = None
    epoch: int | None = None
    task: str | None = None
    label: int | None = None


class ActivationBatchIn(BaseModel):
    batch_id: str | None = Field(default=None, max_length=200)
    rows: list[ActivationRowIn]


class IngestOut(BaseModel):
    batch_id: str
    rows: int
    duplicate: bool


class ActivationRowOut(BaseModel):
    batch_id: str
    row: int
    sample_id: int | None
    step: int | None
    epoch: int | None
    task: str | None
    label: int | None
    values: list[float]


class ActivationPage(BaseModel):
    rows: list[ActivationRowOut]
    next_cursor: str | None


class SummaryOut(BaseModel):
    rows: int
    mean: list[float | None]
    std: list[float | None]
    min: list[float | None]
    max: list[float | None]


class QuantilesRequest(BaseModel):
    n_quantiles: int = Field(ge=2, le=1024)
    method: Literal["exact", "sketch"] = "exact"
    task: str | None = Field(default=None, max_length=200)
    label: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    epoch: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    step_min: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    step_max: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)


class QuantileSetOut(BaseModel):
    id: int
    run_id: int
    layer_id: int
    version: int
    method: str
    n_quantiles: int
    rows: int
    filter: dict[str, Any]
    boundaries: list[list[float]] = Field(description="units x (n_quantiles - 1), ascending per unit")
    rank_error: float | None = Field(description="Sketches: normalized rank error bound (99% confidence).")
    created_at: datetime


class BucketizeRequest(BaseModel):
    values: list[list[float]] = Field(min_length=1)


class BucketizeOut(BaseModel):
    buckets: list[list[int]]


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail
