"""Kernel records: per run, task, layer and kernel, how much the kernel changed and how much it mattered.

A Hebbian client records, for every task it learns, each kernel's mean weight change
||W_t - W_{t-n}|| over the task's intervals (`intervals` of them) and its importance (summed
absolute activation over the task's data). Later tasks, resumed jobs and other processes
read them back, and ask for the top kernels of a layer by either.

The key starts with run_id, so the table can be distributed by run (Citus) beside runs.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-09
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE kernel_records (
            run_id       bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            task         integer NOT NULL CHECK (task >= 0),
            layer        text NOT NULL,
            kernel       integer NOT NULL CHECK (kernel >= 0),
            change       double precision NOT NULL,
            importance   double precision NOT NULL,
            intervals    integer NOT NULL CHECK (intervals >= 0),
            recorded_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (run_id, task, layer, kernel)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE kernel_records")
