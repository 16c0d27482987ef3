"""The sketch ledger: batches committed but not yet folded into their layer's sketches.

Ingest records each batch of a sketched layer here, in its own transaction, instead of
building and merging the KLL sketches there; a sketcher (any service process, or a
request that asks for an up-to-date answer) folds batches in later and deletes their
rows in the same transaction as the sketch update, so a batch is folded exactly once,
even across a crash. `tasks` names the tasks a batch holds ('' for rows without one), so
the sketcher reads the batch back with a fixed-width task code. Quantile sets made from
sketches state what they were behind by: rows committed but not yet folded in, and the
age of the oldest such batch. A downgrade drops the ledger: batches still on it stay out
of the sketches (ask for wait_for answers first to fold them in).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE sketch_backlog (
            run_id      bigint NOT NULL,
            layer_id    bigint NOT NULL REFERENCES layers (id) ON DELETE CASCADE,
            batch_seq   bigint NOT NULL,
            row_count   integer NOT NULL,
            tasks       text[] NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (run_id, layer_id, batch_seq)
        )
        """
    )
    op.execute("ALTER TABLE quantile_sets ADD COLUMN pending_rows bigint, ADD COLUMN lag_s double precision")


def downgrade() -> None:
    op.execute("ALTER TABLE quantile_sets DROP COLUMN pending_rows, DROP COLUMN lag_s")
    op.execute("DROP TABLE sketch_backlog")
