"""A bank's size after every change: `memory_bank_sizes`, one row per bank version.

The dashboard's fill over time could only be reconstructed from items and tombstones,
and an item replaced in place keeps only its latest version, so a full FIFO bank looked
as if it had never been full. Every write and deletion now appends (version, size, time)
in the same transaction as the change; banks that exist start their history here.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE memory_bank_sizes (
            bank_id  bigint NOT NULL REFERENCES memory_banks (id) ON DELETE CASCADE,
            version  bigint NOT NULL,
            size     bigint NOT NULL,
            at       timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (bank_id, version)
        )
        """
    )
    op.execute(
        "INSERT INTO memory_bank_sizes (bank_id, version, size) SELECT id, version, size FROM memory_banks "
        "WHERE version > 0"
    )


def downgrade() -> None:
    op.execute("DROP TABLE memory_bank_sizes")
