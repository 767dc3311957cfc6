"""Models and LoRAs: jobs.model and jobs.loras (what a job runs on, kept by its follow-ups), and
model_settings (a guild's/workspace's default model and allow-lists).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("loras", sa.JSON(), nullable=True))
    op.create_table(
        "model_settings",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("guild_id", sa.String(length=64), nullable=False),
        sa.Column("default_model", sa.String(length=200), nullable=True),
        sa.Column("allowed_models", sa.JSON(), nullable=False),
        sa.Column("allowed_loras", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_settings")),
        sa.UniqueConstraint("platform", "guild_id", name="uq_model_settings_guild"),
    )


def downgrade() -> None:
    op.drop_table("model_settings")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("loras")
        batch_op.drop_column("model")
