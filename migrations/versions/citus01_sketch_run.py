"""Layer sketches carry their run, so that they can live on their run's shard.

On a distributed database every table of a run is placed by `run_id`; the sketches
were keyed by layer alone. On a single server the column is only redundant.

Revision ID: citus01
Revises: 0005
Create Date: 2026-12-09
"""

from alembic import op

revision = "citus01"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE layer_sketches ADD COLUMN run_id bigint")
    op.execute("UPDATE layer_sketches s SET run_id = l.run_id FROM layers l WHERE l.id = s.layer_id")
    op.execute("ALTER TABLE layer_sketches ALTER COLUMN run_id SET NOT NULL")


def downgrade() -> None:
    op.execute("ALTER TABLE layer_sketches DROP COLUMN run_id")
