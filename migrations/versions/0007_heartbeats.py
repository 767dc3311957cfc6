"""Dispatcher heartbeats: dispatcher_heartbeats (owner, beat_at), for taking over the claims of a
dispatcher that stopped beating (bot/core/heartbeats.py).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dispatcher_heartbeats",
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner", name=op.f("pk_dispatcher_heartbeats")),
    )


def downgrade() -> None:
    op.drop_table("dispatcher_heartbeats")
