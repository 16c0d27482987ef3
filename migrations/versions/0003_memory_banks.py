"""Memory banks: items with keys for nearest-neighbour search, a version per change, tombstones.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE memory_banks (
            id                    bigserial PRIMARY KEY,
            project_id            bigint NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
            name                  text NOT NULL,
            dim                   integer NOT NULL CHECK (dim BETWEEN 1 AND 2000),
            value_dim             integer CHECK (value_dim BETWEEN 1 AND 16000),
            metric                text NOT NULL CHECK (metric IN ('cosine', 'l2', 'ip')),
            capacity              integer NOT NULL CHECK (capacity BETWEEN 1 AND 10000000),
            policy                text NOT NULL CHECK (policy IN
                                  ('none', 'fifo', 'same_class_lowest_similarity', 'least_confident')),
            similarity_threshold  double precision NOT NULL,
            hnsw_m                integer NOT NULL DEFAULT 16 CHECK (hnsw_m BETWEEN 2 AND 100),
            hnsw_ef_construction  integer NOT NULL DEFAULT 64 CHECK (hnsw_ef_construction BETWEEN 4 AND 1000),
            version               bigint NOT NULL DEFAULT 0,
            size                  integer NOT NULL DEFAULT 0,
            created_at            timestamptz NOT NULL DEFAULT now(),
            UNIQUE (project_id, name)
        )
        """
    )
    # One partition per bank: pgvector indexes need a fixed dimension, so each partition
    # carries an HNSW index on key::vector(dim) with the operator class of its metric.
    # FIFO order is (inserted_version, inserted_rank): the write that stored an item and its
    # place in that write. An item replaced in place keeps its id and takes the new version; a deleted one
    # leaves a tombstone, so a cache following `since=version` sees every change.
    op.execute(
        """
        CREATE TABLE memory_items (
            bank_id           bigint NOT NULL,
            id                bigserial,
            key               vector NOT NULL,
            label             integer,
            value             vector,
            confidence        real,
            version           bigint NOT NULL,
            inserted_version  bigint NOT NULL,
            inserted_rank     integer NOT NULL DEFAULT 0,
            PRIMARY KEY (bank_id, id)
        ) PARTITION BY LIST (bank_id)
        """
    )
    op.execute("CREATE INDEX memory_items_version ON memory_items (bank_id, version)")
    op.execute(
        """
        CREATE TABLE memory_tombstones (
            bank_id   bigint NOT NULL REFERENCES memory_banks (id) ON DELETE CASCADE,
            item_id   bigint NOT NULL,
            version   bigint NOT NULL,
            PRIMARY KEY (bank_id, item_id)
        )
        """
    )
    op.execute("CREATE INDEX memory_tombstones_version ON memory_tombstones (bank_id, version)")
    # Hits live apart from the items: counting one would otherwise write a new item tuple
    # (and, unless the update is HOT, a new entry in the HNSW graph) on every search.
    op.execute(
        """
        CREATE TABLE memory_hits (
            bank_id   bigint NOT NULL REFERENCES memory_banks (id) ON DELETE CASCADE,
            item_id   bigint NOT NULL,
            hits      bigint NOT NULL,
            PRIMARY KEY (bank_id, item_id)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE memory_hits")
    op.execute("DROP TABLE memory_tombstones")
    op.execute("DROP TABLE memory_items")
    op.execute("DROP TABLE memory_banks")
