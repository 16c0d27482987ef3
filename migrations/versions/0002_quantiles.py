"""Quantiles: versioned quantile sets and per-layer, per-task KLL sketches kept by ingest.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Boundaries are a float32 matrix (units x Q-1) stored as raw bytes: compact, and read
    # back with one numpy call; 16,000 units x 1,023 boundaries is 65 MB at the extreme.
    op.execute(
        """
        CREATE TABLE quantile_sets (
            id            bigserial PRIMARY KEY,
            run_id        bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            layer_id      bigint NOT NULL REFERENCES layers (id) ON DELETE CASCADE,
            version       integer NOT NULL,
            n_quantiles   integer NOT NULL CHECK (n_quantiles BETWEEN 2 AND 1024),
            method        text NOT NULL CHECK (method IN ('exact', 'sketch')),
            filter        jsonb NOT NULL DEFAULT '{}'::jsonb,
            rows_used     bigint NOT NULL,
            units         integer NOT NULL,
            boundaries    bytea NOT NULL,
            rank_error    double precision,
            created_at    timestamptz NOT NULL DEFAULT now(),
            UNIQUE (layer_id, version)
        )
        """
    )
    # One KLL sketch per unit, per (layer, task); task '' holds rows without a task. Updated
    # in the ingest transaction, so they always describe exactly the committed rows.
    op.execute(
        """
        CREATE TABLE layer_sketches (
            layer_id    bigint NOT NULL REFERENCES layers (id) ON DELETE CASCADE,
            task        text NOT NULL,
            k           integer NOT NULL,
            n           bigint NOT NULL,
            sketches    bytea[] NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (layer_id, task)
        )
        """
    )
    # KLL sketches don't compress: storing them uncompressed saves pglz's time on every ingest.
    op.execute("ALTER TABLE layer_sketches ALTER COLUMN sketches SET STORAGE EXTERNAL")
    op.execute("ALTER TABLE layers ADD COLUMN sketch boolean NOT NULL DEFAULT true")


def downgrade() -> None:
    op.execute("ALTER TABLE layers DROP COLUMN sketch")
    op.execute("DROP TABLE layer_sketches")
    op.execute("DROP TABLE quantile_sets")
