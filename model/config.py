"""Every setting of the training side in one place, read from the environment and `.env`.

The names are the seed's (USE_DB) and the service's (DATABASE_URL), unprefixed, so one
`.env` file serves a training job and the service beside it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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
        default=32 * 1024 * 1024,
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
    writer_max_attempts: int = Field(
        default=8, ge=1, validation_alias=AliasChoices("EIDETIC_WRITER_MAX_ATTEMPTS", "writer_max_attempts")
    )

    def api_key(self) -> str | None:
        return self.eidetic_api_key.get_secret_value() if self.eidetic_api_key else None
