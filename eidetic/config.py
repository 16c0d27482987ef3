"""Every setting of the training side in one place, read from the environment and `.env`.

The names are the seed's (USE_DB) and the service's (DATABASE_URL), unprefixed, so one
`.env` file serves a training job and the service beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


def default_spill_dir() -> Path:
    """Where writers keep batches the store could not take yet: the user's cache, never the working directory."""
    return Path(platformdirs.user_cache_dir("eidetic")) / "spill"


class ClientSettings(BaseSettings):
    """Where the store is and how a training job talks to it; constructor arguments win over the environment."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    use_db: bool = Field(
        default=False,
        validation_alias=AliasChoices("USE_DB", "use_db"),
        description="Record runs and activations in the store (true/1/yes/on, false/0/no/off).",
    )
    eidetic_url: str = Field(
        default="http://127.0.0.1:8000",
        validation_alias=AliasChoices("EIDETIC_URL", "eidetic_url"),
        description="Base URL of the Eidetic service.",
    )
    eidetic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("EIDETIC_API_KEY", "eidetic_api_key"),
        description="Bearer key; unset when the service runs without auth on loopback.",
    )
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "database_url"),
        description="PostgreSQL URL for the direct transport (trusted workers only).",
    )
    eidetic_transport: Literal["rest", "direct"] = Field(
        default="rest",
        validation_alias=AliasChoices("EIDETIC_TRANSPORT", "eidetic_transport"),
        description="How ActivationWriter sends batches. Direct needs DATABASE_URL; it is never picked "
        "just because DATABASE_URL is set, since the service may share that variable.",
    )
    request_timeout_s: float = Field(
        default=60.0,
        gt=0,
        validation_alias=AliasChoices("EIDETIC_REQUEST_TIMEOUT_S", "request_timeout_s"),
    )
    writer_batch_rows: int = Field(
        default=32768, ge=1, validation_alias=AliasChoices("EIDETIC_WRITER_BATCH_ROWS", "writer_batch_rows")
    )
    writer_max_batch_bytes: int = Field(
        default=32 * MIB,
        ge=1,
        validation_alias=AliasChoices("EIDETIC_WRITER_MAX_BATCH_BYTES", "writer_max_batch_bytes"),
        description="Values per sent batch, in bytes; keep it under the service's body limit (64 MiB by default).",
    )
    writer_queue_size: int = Field(
        default=256,
        ge=1,
        validation_alias=AliasChoices("EIDETIC_WRITER_QUEUE_SIZE", "writer_queue_size"),
        description="Writes (training batches) that may wait for the sender before write() blocks.",
    )
    writer_in_flight: int = Field(
        default=2,
        ge=1,
        validation_alias=AliasChoices("EIDETIC_WRITER_IN_FLIGHT", "writer_in_flight"),
        description="Batches on their way to the store at once; 1 sends (and commits) strictly in order.",
    )
    writer_retry_budget_s: float = Field(
        default=600.0,
        gt=0,
        validation_alias=AliasChoices("EIDETIC_WRITER_RETRY_BUDGET_S", "writer_retry_budget_s"),
        description="How long the store may stay unreachable (from the first failed attempt, reset when it "
        "answers) before the writer gives up with StoreUnavailable.",
    )
    writer_max_backoff_s: float = Field(
        default=10.0,
        gt=0,
        validation_alias=AliasChoices("EIDETIC_WRITER_MAX_BACKOFF_S", "writer_max_backoff_s"),
        description="Longest wait between two attempts of a batch (the waits double from 0.2 s up to it).",
    )
    writer_max_attempts: int | None = Field(
        default=None,
        ge=1,
        validation_alias=AliasChoices("EIDETIC_WRITER_MAX_ATTEMPTS", "writer_max_attempts"),
        description="Attempts per batch within the budget; unset = as many as the budget allows.",
    )
    writer_memory_backlog_bytes: int = Field(
        default=64 * MIB,
        ge=0,
        validation_alias=AliasChoices("EIDETIC_WRITER_MEMORY_BACKLOG_BYTES", "writer_memory_backlog_bytes"),
        description="Batches waiting for the store that are kept in memory; beyond it the writer spills "
        "(during an outage) or write() blocks (while the store is merely slow).",
    )
    writer_spill_dir: Path = Field(
        default_factory=default_spill_dir,
        validation_alias=AliasChoices("EIDETIC_WRITER_SPILL_DIR", "writer_spill_dir"),
        description="Where batches go when an outage outlasts the memory backlog (a directory per writer).",
    )
    writer_spill_max_bytes: int = Field(
        default=4 * 1024 * MIB,
        ge=0,
        validation_alias=AliasChoices("EIDETIC_WRITER_SPILL_MAX_BYTES", "writer_spill_max_bytes"),
        description="Most bytes one writer spills; past it write() blocks. 0 never spills.",
    )

    def api_key(self) -> str | None:
        return self.eidetic_api_key.get_secret_value() if self.eidetic_api_key else None
