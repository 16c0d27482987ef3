"""Every setting of the service in one place, read from the environment and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import platformdirs
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EIDETIC_", env_file=".env", extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "EIDETIC_DATABASE_URL"),
        description="An external PostgreSQL with pgvector; unset means the embedded server.",
    )
    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("eidetic")) / "pgdata",
        description="The embedded server's data directory (the same thing `--data-dir` names).",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    no_auth: bool = False

    max_body_bytes: int = 64 * MIB
    max_rows_per_batch: int = 1_000_000
    max_dim: int = 16_000
    max_page_limit: int = 10_000
    default_page_limit: int = 500
    stream_window_rows: int = Field(
        default=8192, ge=1, description="Rows read per statement of an Arrow stream (activations, bank snapshots)."
    )
    reject_non_finite: bool = True

    sketch_k: int = Field(default=400, ge=8, le=65535, description="KLL k of the quantile sketches.")
    sketcher: bool = Field(
        default=True, description="Run the background sketcher, which folds ingested batches into the sketches."
    )
    sketch_poll_s: float = Field(default=0.2, gt=0, description="How often an idle sketcher looks for new batches.")
    sketch_quiet_s: float = Field(
        default=0.5, ge=0, description="The sketcher folds a layer once no batch has arrived for this long..."
    )
    sketch_max_lag_s: float = Field(
        default=10.0, ge=0, description="...or once its oldest batch not yet in the sketches is this old."
    )
    sketch_lock_timeout_ms: int = Field(
        default=100,
        ge=1,
        description="How long the sketcher waits for a lock on a layer's partition before leaving the layer for later.",
    )
    sketch_fold_values: int = Field(
        default=1 << 24, ge=1, description="Values (rows x dim) one fold sketches at most (one batch at least)."
    )
    max_quantile_memory_bytes: int = 1024 * MIB
    max_bucketize_rows: int = 100_000
    aggregate_sample_rows: int = Field(
        default=100_000,
        ge=1,
        description="A unit's distribution and histogram read a block sample of about this many rows when the "
        "layer holds more; the answer says it is sampled.",
    )
    summary_sample_rows: int = Field(
        default=20_000,
        ge=1,
        description="The same for a summary with sample=true: fewer rows, as every unit of each row is read.",
    )

    max_search_k: int = 1000
    max_search_queries: int = 4096
    max_items_per_write: int = 10_000
    merge_interval_s: float = Field(
        default=1.0, ge=0, description="How often the service looks for segmented banks due a merge (0: never)."
    )
    merge_idle_s: float = Field(
        default=30.0,
        ge=0,
        description="A segmented bank unwritten this long is sealed and compacted into one segment (0: never).",
    )
    growing_cache_mb: int = Field(
        default=512,
        ge=0,
        description="Memory each service process may hold the growing items of segmented banks in, between "
        "searches (0: read them for every search).",
    )
    exact_scan_values: int = Field(
        default=8 * 2**20,
        ge=0,
        description="The newest sealed segments of a segmented bank, while they hold at most this many values "
        "(rows x dim) together, are held with its growing items and searched exactly instead of by their "
        "HNSW indexes (a matmul is cheaper than a graph walk at that size).",
    )
    merge_maintenance_work_mem_mb: int = Field(
        default=256,
        ge=1,
        le=65536,
        description="maintenance_work_mem of a merge's index build (an HNSW build "
        "that fits in it is several times faster).",
    )
    merge_build_workers: int = Field(
        default=0,
        ge=-1,
        le=64,
        description="Parallel workers a merge's index build may use (PostgreSQL's max_parallel_maintenance_workers; "
        "-1: the server's own). 0 by default: a build is background work, and with workers it takes every CPU "
        "from the searches.",
    )

    statement_timeout_ms: int = 30_000
    scan_timeout_ms: int = 600_000  # exact quantiles read whole layers
    request_timeout_s: float = 60.0
    cancel_grace_s: float = Field(
        default=1.0, gt=0, description="How long before a request's deadline its running statement is cancelled."
    )
    connect_timeout_s: int = Field(default=5, ge=2, description="libpq's connect_timeout (it counts 2 s at least).")
    probe_interval_s: float = Field(default=0.25, gt=0, description="How often the database is probed while down.")
    heartbeat_s: float = Field(default=1.0, gt=0, description="How often the database is probed while up.")
    probe_timeout_s: float = Field(
        default=1.0, gt=0, description="A probe unanswered this long (a frozen server) marks the database down."
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After of every 503.")
    pool_min_size: int = 1
    pool_max_size: int = 10


@lru_cache
def get_settings() -> Settings:
    return Settings()
