"""Request and response bodies of the REST API (v1)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.banks.schema import DEFAULT_MERGE_FACTOR, DEFAULT_MERGE_THRESHOLD
from eidetic.wire.meta import MAX_META_BYTES, meta_problem
from eidetic.wire.text import text_problem


def _storable(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(f"the text {problem}")
    return value


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_storable)]


def _bounded_meta(value: dict[str, Any]) -> dict[str, Any]:
    problem = meta_problem(value)
    if problem is not None:
        raise ValueError(f"meta {problem}")
    return value


ItemMeta = Annotated[
    dict[str, Any],
    AfterValidator(_bounded_meta),
    Field(description=f"A JSON object stored with the item (at most {MAX_META_BYTES} bytes as compact JSON)."),
]


class RequestBody(BaseModel):
    """A request body: strict types ("1.5" is not a number, true is not 1) and no unknown fields.

    A misspelt field ("polcy") is refused by name instead of leaving a default in its place.
    """

    model_config = ConfigDict(extra="forbid", strict=True)


class RunCreate(RequestBody):
    name: Name
    config: dict[str, Any] = Field(default_factory=dict)


class RunUpdate(RequestBody):
    status: Literal["running", "finished", "failed"] | None = None
    metrics: dict[str, Any] | None = Field(default=None, description="Merged into the run's metrics.")


class RunOut(BaseModel):
    id: int
    name: str
    config: dict[str, Any]
    status: str
    created_at: datetime
    metrics: dict[str, Any]


class RunList(BaseModel):
    runs: list[RunOut]


class LayerCreate(RequestBody):
    name: Name
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


class ActivationRowIn(RequestBody):
    """One row of the JSON ingest format (documentation; bulk clients send Arrow)."""

    values: list[float]
    sample_id: int | None = None
    step: int | None = None
    epoch: int | None = None
    task: Name | None = None
    label: int | None = None


class ActivationBatchIn(RequestBody):
    batch_id: Name | None = None
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
    values: list[float | None] = Field(description="null where a stored value is not finite.")


class ActivationPage(BaseModel):
    rows: list[ActivationRowOut]
    next_cursor: str | None


class SampleOut(BaseModel):
    """What an aggregate read: every selected row, or a block sample of the layer (then `rows` counts the sample's)."""

    sampled: bool = Field(default=False, description="True when a block sample was read instead of every row.")
    sample_percent: float | None = Field(
        default=None, description="The percent of the layer's pages read (TABLESAMPLE SYSTEM), when sampled."
    )
    layer_rows: int | None = Field(default=None, description="Rows stored in the layer (all filters aside).")


class SummaryOut(SampleOut):
    rows: int
    mean: list[float | None]
    std: list[float | None]
    min: list[float | None]
    max: list[float | None]


class QuantilesRequest(RequestBody):
    n_quantiles: int = Field(ge=2, le=1024)
    method: Literal["exact", "sketch"] = "exact"
    task: Name | None = None
    label: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    epoch: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    step_min: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    step_max: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    wait_for: float | None = Field(
        default=None,
        ge=0,
        description="method=sketch: seconds to wait for every batch committed before the request to be in the "
        "sketches (folding them in if need be); past that, a 503 `sketches_behind`. Unset: the sketches as they are.",
    )


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
    pending_rows: int | None = Field(
        default=None, description="Sketches: rows of the layer committed but not yet in the sketches (not in rows)."
    )
    lag_s: float | None = Field(
        default=None, description="Sketches: age in seconds of the oldest batch not yet in the sketches (0: caught up)."
    )


class QuantileSetInfoOut(BaseModel):
    id: int
    version: int
    method: str
    n_quantiles: int
    rows: int
    filter: dict[str, Any]
    rank_error: float | None
    created_at: datetime


class QuantileSetList(BaseModel):
    sets: list[QuantileSetInfoOut] = Field(
        description="Newest version first; GET /v1/quantile-sets/{id} for boundaries."
    )


class BucketizeRequest(RequestBody):
    values: list[list[float]] = Field(min_length=1)


class BucketizeOut(BaseModel):
    buckets: list[list[int]]


class BankCreate(RequestBody):
    name: Name
    dim: int = Field(ge=1, le=2000, description="Key dimension (pgvector's HNSW index takes up to 2,000).")
    metric: Literal["cosine", "l2", "ip"] = "cosine"
    capacity: int = Field(ge=1, le=10_000_000)
    policy: Literal["none", "fifo", "same_class_lowest_similarity", "least_confident"] = "same_class_lowest_similarity"
    similarity_threshold: float = Field(
        default=0.85,
        allow_inf_nan=False,
        description="When full, an item is stored only if its best similarity is below this.",
    )
    value_dim: int | None = Field(
        default=None, ge=1, le=16_000, description="Length of item values, if items carry them."
    )
    hnsw_m: int = Field(
        default=16, ge=2, le=100, description="HNSW graph degree (higher: better recall, slower build)."
    )
    hnsw_ef_construction: int = Field(default=64, ge=4, le=1000, description="HNSW build-time candidate list.")
    merge_threshold: int = Field(
        default=DEFAULT_MERGE_THRESHOLD,
        ge=0,
        le=1_000_000,
        description="Items in the growing segment (unindexed, searched exactly) that start a background merge "
        "into an HNSW segment built in bulk. 0: no segments, every write goes into one live HNSW index.",
    )
    merge_factor: int = Field(
        default=DEFAULT_MERGE_FACTOR,
        ge=2,
        le=64,
        description="How many sealed segments of one size tier a merge compacts into one.",
    )


class BankOut(BaseModel):
    id: int
    name: str
    dim: int
    value_dim: int | None
    metric: str
    capacity: int
    policy: str
    similarity_threshold: float
    version: int
    size: int
    created_at: datetime
    hnsw_m: int
    hnsw_ef_construction: int
    merge_threshold: int
    merge_factor: int


class SegmentOut(BaseModel):
    lo: int = Field(description="The segment holds the items with a version above lo ...")
    hi: int = Field(description="... and at most hi.")
    rows: int = Field(description="Its items when its index was built (replaced items have left it since).")


class SegmentsOut(BaseModel):
    merged: bool = Field(description="Whether this request ran a merge (False: the bank has no segments).")
    sealed_rows: int = Field(description="Items this merge sealed into a new segment.")
    compacted_segments: int = Field(description="Sealed segments this merge compacted into larger ones.")
    segments: list[SegmentOut] = Field(description="The sealed segments after it, oldest first.")
    growing_rows: int = Field(description="Items in the growing segment after it (searched exactly).")


class BankList(BaseModel):
    banks: list[BankOut]


class ItemIn(RequestBody):
    key: list[float] = Field(min_length=1)
    label: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    value: list[float] | None = None
    confidence: float | None = None
    meta: ItemMeta | None = None


class ItemsIn(RequestBody):
    items: list[ItemIn] = Field(min_length=1)


class WriteOut(BaseModel):
    inserted: int
    replaced: int
    skipped: int
    version: int
    ids: list[int | None] = Field(description="Per item: the id it was stored under, or null if skipped.")


class BankVersionOut(BaseModel):
    version: int = Field(description="The bank's version after the change.")


class SearchIn(RequestBody):
    queries: list[list[float]] = Field(min_length=1, description="A batch of query keys (a training batch).")
    k: int = Field(default=10, ge=1)
    exact: bool = False
    ef_search: int = Field(default=100, ge=1, le=1000)
    labels: list[int] | None = Field(default=None, max_length=10_000)
    with_meta: bool = Field(default=False, description="Answer each neighbour's meta too (`metas`).")


class NeighboursOut(BaseModel):
    ids: list[int]
    scores: list[float]
    labels: list[int | None]
    prediction: int | None
    confidence: float
    metas: list[dict[str, Any] | None] | None = Field(
        default=None, description="Per neighbour: its meta, or null; present only when asked (`with_meta`)."
    )


class SearchOut(BaseModel):
    results: list[NeighboursOut]


class ChangesOut(BaseModel):
    items: list[dict[str, Any]]
    tombstones: list[dict[str, int]]
    version: int
    next_since: int | None


class IslandBankOut(BaseModel):
    island_set: str
    level: int
    bank_id: int
    size: int = Field(description="Islands stored at this level.")


class IslandBankList(BaseModel):
    banks: list[IslandBankOut]


class IslandOut(BaseModel):
    id: int = Field(description="The island's item id.")
    bank_id: int
    level: int
    label: int | None = Field(description="The class of the island's image, when known.")
    meta: dict[str, Any] = Field(description="The island's row: sample, size, bbox, mask, grid, parent, ...")


class IslandNodeOut(IslandOut):
    children: list[IslandNodeOut] = Field(description="The islands one level down whose parent this is.")


class IslandTreeOut(BaseModel):
    run_id: int
    island_set: str
    sample: int
    roots: list[IslandNodeOut] = Field(description="The top islands, largest first; children likewise.")


class IslandNeighbourOut(BaseModel):
    id: int
    score: float = Field(description="Similarity to the island (cosine for cosine banks).")
    label: int | None
    meta: dict[str, Any] | None


class IslandNeighboursOut(BaseModel):
    island: IslandOut
    neighbours: list[IslandNeighbourOut] = Field(description="Islands of other images, most similar first.")


class IslandSearchOut(BaseModel):
    run_id: int
    island_set: str
    sample: int
    level: int
    results: list[IslandNeighboursOut]


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    revision: str | None = Field(default=None, description="Readiness: the schema's migration revision.")
    reason: str | None = Field(default=None, description="Why the service is not ready.")


class KernelRecordsIn(RequestBody):
    """One task's record set of one layer: a change and an importance per kernel, in kernel order."""

    task: int = Field(ge=0, le=2**31 - 1, description="The task's index in the run (0, 1, ...).")
    layer: Name
    change: list[float] = Field(
        min_length=1, max_length=100_000, description="Per kernel: mean ||W_t - W_{t-n}|| over the task."
    )
    importance: list[float] = Field(
        min_length=1, max_length=100_000, description="Per kernel: summed absolute activation over the task."
    )
    intervals: int = Field(default=0, ge=0, le=2**31 - 1, description="How many intervals the change averages.")


class KernelRecordsWritten(BaseModel):
    task: int
    layer: str
    kernels: int
    intervals: int


class KernelRecordSetOut(BaseModel):
    task: int
    layer: str
    intervals: int
    change: list[float]
    importance: list[float]
    recorded_at: datetime


class KernelRecordList(BaseModel):
    records: list[KernelRecordSetOut]


class TopKernelsOut(BaseModel):
    task: int
    layer: str
    by: Literal["change", "importance"]
    n_kernels: int = Field(description="Kernels the layer has in this record set.")
    kernels: list[int] = Field(description="Kernel indices, largest value first (ties: lower index first).")
    values: list[float]


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail


class StepBucketOut(BaseModel):
    step_min: int
    step_max: int
    rows: int
    values: list[float] = Field(description="The unit's value at each of the response's percentiles.")


class DistributionOut(SampleOut):
    unit: int
    percentiles: list[float] = Field(description="The percentiles of every bucket's values, 0 to 100.")
    buckets: list[StepBucketOut] = Field(description="Equal-width step buckets that hold rows, in step order.")


class HistogramOut(SampleOut):
    unit: int
    rows: int = Field(description="Rows counted (of the sample, when sampled).")
    edges: list[float] = Field(description="bins + 1 ascending bin edges (empty when no row matched).")
    counts: list[int]


class RunStatsOut(BaseModel):
    run_id: int
    name: str
    status: str
    layers: int
    rows: int = Field(description="Activation rows stored (from the ingest ledger).")
    bytes: int = Field(description="Disk used by the run's activations, indexes included.")
    last_ingest_at: datetime | None
    rows_last_minute: int


class StatsOut(BaseModel):
    runs: list[RunStatsOut]


class BankItemOut(BaseModel):
    id: int
    label: int | None
    confidence: float | None
    version: int
    hits: int


class LabelCountOut(BaseModel):
    label: int | None
    items: int


class BankItemsOut(BaseModel):
    items: list[BankItemOut]
    labels: list[LabelCountOut] = Field(description="Items per label over the whole bank.")
    next_after_id: int | None


class BankFillOut(BaseModel):
    version: int = Field(description="The bank's version now.")
    size: int
    capacity: int
    versions: list[int] = Field(
        description="The last change (version) of each equal-width version bucket that had one, ascending; "
        "the history starts at the bank's creation, or at migration 0009 for banks made before it."
    )
    sizes: list[int] = Field(description="The bank's size right after that change.")
    times: list[float] = Field(description="When that change committed, in Unix seconds.")


class ProjectionOut(BaseModel):
    ids: list[int]
    labels: list[int | None]
    x: list[float]
    y: list[float]
    explained_variance: list[float] = Field(description="Fraction of the sample's variance on each axis.")
    size: int = Field(description="Items in the bank (the projection shows a sample of them).")
