"""Memory items carry an optional JSON object, `meta`, that describes what a key stands for.

Island rows of GLOM, for instance, keep their image, level, size, bounding box, mask and
parent item there. The service bounds its size (4 KiB as compact JSON) and refuses
non-finite numbers; the database holds it as jsonb, an object or nothing, with a GIN
index (jsonb_path_ops) for look-ups by containment (`meta @> '{"sample": 3}'`), built on
every bank's partition.

Revision ID: 0006
Revises: citus01
Create Date: 2026-12-09
"""

from alembic import op

revision = "0006"
down_revision = "citus01"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE memory_items ADD COLUMN meta jsonb CONSTRAINT memory_items_meta_object "
        "CHECK (meta IS NULL OR jsonb_typeof(meta) = 'object')"
    )
    op.execute("CREATE INDEX memory_items_meta ON memory_items USING gin (meta jsonb_path_ops)")


def downgrade() -> None:
    op.execute("DROP INDEX memory_items_meta")
    op.execute("ALTER TABLE memory_items DROP COLUMN meta")
