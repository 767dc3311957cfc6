"""jobs.fair_round and the indexes of the fair order: claims and queue positions read the first
entries of an index instead of ranking every queued job (issue 19).

Queued jobs of an old database get their round from their place among their user's queued jobs
(the old order's rank), so the queue keeps its order across the upgrade.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fair_round", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.create_index("ix_jobs_state_fair", ["state", "fair_round", "id"], unique=False)
        batch_op.create_index("ix_jobs_user_state_fair", ["user_id", "state", "fair_round"], unique=False)
    # Runs once at upgrade time; quadratic per user, which only matters for queues nobody has.
    op.execute(
        "UPDATE jobs SET fair_round = (SELECT count(*) FROM jobs AS older WHERE older.user_id = "
        "jobs.user_id AND older.state = 'queued' AND older.id < jobs.id) WHERE state = 'queued'"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_user_state_fair")
        batch_op.drop_index("ix_jobs_state_fair")
        batch_op.drop_column("fair_round")
