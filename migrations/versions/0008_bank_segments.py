"""Segmented memory banks: new items land in an unindexed growing segment, and a background
merge seals them into HNSW-indexed segments built in bulk.

A sealed segment is a range of bank versions, (lo, hi]: the items whose `version` lies in it,
with a partial HNSW index `WHERE version > lo AND version <= hi` on the bank's partition.
An item replaced later takes a new version, so it leaves its sealed segment by itself (its
new tuple matches no segment's index and costs no graph insert); the growing segment is
every item above the last sealed version, searched exactly. `memory_segments` lists the
sealed segments whose index is built; search reads it, the merge alone writes it.

`merge_threshold` is the growing segment's size that starts a merge (0: no segments, every
write goes into one live HNSW index as before this revision; banks that exist keep that),
`merge_factor` how many sealed segments of one size tier are compacted into one.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE memory_banks "
        "ADD COLUMN merge_threshold integer NOT NULL DEFAULT 0 CHECK (merge_threshold BETWEEN 0 AND 1000000), "
        "ADD COLUMN merge_factor integer NOT NULL DEFAULT 4 CHECK (merge_factor BETWEEN 2 AND 64)"
    )
    op.execute(
        """
        CREATE TABLE memory_segments (
            bank_id     bigint NOT NULL REFERENCES memory_banks (id) ON DELETE CASCADE,
            lo          bigint NOT NULL,
            hi          bigint NOT NULL CHECK (hi > lo),
            rows        bigint NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (bank_id, lo)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE memory_segments")
    op.execute("ALTER TABLE memory_banks DROP COLUMN merge_factor, DROP COLUMN merge_threshold")
