"""The audit log: every admin operation, and every refused attempt at one, as a row."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.api import Actor, AuditEntry, NotAdmin
from bot.core.db import Database
from bot.core.models import AuditLog


class Audit:
    def __init__(self, db: Database, clock: Callable[[], dt.datetime]):
        self.db = db
        self.clock = clock

    def record(
        self, s: AsyncSession, actor: Actor, action: str, target: str, details: Mapping[str, Any]
    ) -> None:
        """Add an entry to the unit of work `s`: it is written if, and only if, the operation is."""
        s.add(
            AuditLog(
                created_at=self.clock(),
                actor_platform=actor.platform,
                actor_user_id=actor.user_id,
                action=action,
                target=target,
                details=dict(details),
            )
        )

    async def require_admin(self, actor: Actor, operation: str, target: str = "") -> None:
        """NotAdmin unless `actor.is_admin`."""
        if actor.is_admin:
            return
        # Refusals are audited too: repeated attempts are worth seeing.
        async with self.db.session() as s:
            self.record(s, actor, f"refused:{operation}", target, {})
        raise NotAdmin(operation)

    async def latest(self, platform: str, limit: int) -> list[AuditEntry]:
        """The newest `limit` entries of actors on `platform`, newest first."""
        async with self.db.read() as s:
            rows = (
                (
                    await s.execute(
                        select(AuditLog)
                        .where(AuditLog.actor_platform == platform)
                        .order_by(AuditLog.id.desc())
                        .limit(limit)
                    )
                )
                .scalars()
                .all()
            )
        return [
            AuditEntry(
                r.id, r.created_at, r.actor_platform, r.actor_user_id, r.action, r.target, dict(r.details)
            )
            for r in rows
        ]
