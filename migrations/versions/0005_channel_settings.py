"""Channel settings: channel_settings (per guild/workspace and per channel: allowed channels,
private mode, a channel's default model, aspect ratio and steps). Role limits need no new table:
they are quota_limits rows of scope "role".

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "channel_settings",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("guild_id", sa.String(length=64), nullable=False),
        sa.Column("channel_id", sa.String(length=64), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("private", sa.Boolean(), nullable=True),
        sa.Column("default_model", sa.String(length=200), nullable=True),
        sa.Column("default_aspect_ratio", sa.String(length=16), nullable=True),
        sa.Column("default_steps", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_channel_settings")),
        sa.UniqueConstraint("platform", "guild_id", "channel_id", name="uq_channel_settings_channel"),
    )


def downgrade() -> None:
    op.drop_table("channel_settings")
