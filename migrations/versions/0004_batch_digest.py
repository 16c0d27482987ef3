"""The ingest ledger keeps a digest of each batch's content.

A batch id then names one content: a resend of the same rows is a duplicate, other rows
under a used id are a conflict. Batches stored before this revision have no digest and
are compared by row count only.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE ingest_batches ADD COLUMN digest bytea")


def downgrade() -> None:
    op.execute("ALTER TABLE ingest_batches DROP COLUMN digest")
