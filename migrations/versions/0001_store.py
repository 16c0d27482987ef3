"""The store: projects, API keys, runs, layers, the ingest ledger and partitioned activations.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.execute(
        """
        CREATE TABLE projects (
            id          bigserial PRIMARY KEY,
            name        text NOT NULL UNIQUE,
            created_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE api_keys (
            id          bigserial PRIMARY KEY,
            project_id  bigint NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
            key_prefix  text NOT NULL,
            key_hash    bytea NOT NULL UNIQUE,
            scope       text NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz
        )
        """
    )
    op.execute(
        """
        CREATE TABLE runs (
            id          bigserial PRIMARY KEY,
            project_id  bigint NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
            name        text NOT NULL,
            config      jsonb NOT NULL DEFAULT '{}'::jsonb,
            metrics     jsonb NOT NULL DEFAULT '{}'::jsonb,
            status      text NOT NULL DEFAULT 'running'
                        CHECK (status IN ('running', 'finished', 'failed')),
            created_at  timestamptz NOT NULL DEFAULT now(),
            UNIQUE (project_id, name)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE layers (
            id          bigserial PRIMARY KEY,
            run_id      bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            name        text NOT NULL,
            dim         integer NOT NULL CHECK (dim > 0),
            kind        text NOT NULL DEFAULT 'activations',
            created_at  timestamptz NOT NULL DEFAULT now(),
            UNIQUE (run_id, name)
        )
        """
    )
    # One row per acknowledged batch: a retried batch finds its row and is not copied again.
    op.execute(
        """
        CREATE TABLE ingest_batches (
            id          bigserial PRIMARY KEY,
            run_id      bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            layer_id    bigint NOT NULL REFERENCES layers (id) ON DELETE CASCADE,
            batch_id    text NOT NULL,
            row_count   integer NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            UNIQUE (layer_id, batch_id)
        )
        """
    )
    op.execute("CREATE INDEX ingest_batches_layer_seq ON ingest_batches (layer_id, id)")
    # Partitioned by run, then by layer: dropping a run drops its partitions (no row-by-row
    # delete), and every scan of a layer stays inside that layer's partition. Rows are
    # addressed by (batch_seq, row_no): the ledger id of their batch and their place in it.
    op.execute(
        """
        CREATE TABLE activations (
            run_id      bigint NOT NULL,
            layer_id    bigint NOT NULL,
            batch_seq   bigint NOT NULL,
            row_no      integer NOT NULL,
            sample_id   bigint,
            step        bigint,
            epoch       integer,
            label       integer,
            task        text,
            "values"    vector NOT NULL
        ) PARTITION BY LIST (run_id)
        """
    )
    # BRIN, not B-tree: rows arrive in batch order, so block ranges summarise them almost
    # for free while streaming in (a B-tree slows COPY), and keyset pages read batch windows.
    op.execute("CREATE INDEX activations_batch_brin ON activations USING brin (batch_seq)")


def downgrade() -> None:
    op.execute("DROP TABLE activations")
    op.execute("DROP TABLE ingest_batches")
    op.execute("DROP TABLE layers")
    op.execute("DROP TABLE runs")
    op.execute("DROP TABLE api_keys")
    op.execute("DROP TABLE projects")
