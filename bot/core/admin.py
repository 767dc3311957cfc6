"""Admin operations on users and guilds: limits, credits, usage resets, bans, and the audit log.

Adapters decide who is an admin (`Actor.is_admin`); every operation here refuses anyone else with
`NotAdmin`, and writes the operation, or the refusal, to the audit log. Targets are user ids on the
actor's platform.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core import validate
from bot.core.api import Actor, AuditEntry, BadParameters, Place, QuotaView
from bot.core.audit import Audit
from bot.core.db import Database
from bot.core.models import QuotaLimit
from bot.core.quotas import Quotas, role_scope_id

MAX_GRANT = 10_000  # a typo guard: nobody means to grant a million images
MAX_DAILY_LIMIT = 100_000  # the same guard for limits
MAX_AUDIT_PAGE = 100  # one chat message's worth of entries; bigger asks are capped


class Admin:
    def __init__(self, db: Database, quotas: Quotas, audit: Audit, *, clock: Callable[[], dt.datetime]):
        self.db = db
        self.quotas = quotas
        self.audit = audit
        self.clock = clock

    async def usage(self, actor: Actor, place: Place, target_user_id: str) -> QuotaView:
        actor, place = validate.actor_and_place(actor, place)
        target_user_id = validate.ident("user", target_user_id)
        await self.audit.require_admin(actor, "usage", target_user_id)
        async with self.db.session() as s:
            self.audit.record(s, actor, "usage", f"user:{target_user_id}", {"guild_id": place.guild_id})
            return await self.quotas.view(s, actor.platform, target_user_id, place.guild_id)

    async def set_user_limit(self, actor: Actor, target_user_id: str, daily_limit: int | None) -> QuotaView:
        actor = validate.actor(actor)
        target_user_id = validate.ident("user", target_user_id)
        await self.audit.require_admin(actor, "set_user_limit", target_user_id)
        _check_limit(daily_limit)
        async with self.db.session() as s:
            await self.quotas.lock_user(s, actor.platform, target_user_id)
            await self._set_limit(s, actor.platform, "user", target_user_id, daily_limit)
            self.audit.record(
                s, actor, "set_user_limit", f"user:{target_user_id}", {"daily_limit": daily_limit}
            )
            await s.flush()
            return await self.quotas.view(s, actor.platform, target_user_id, None)

    async def set_guild_limit(self, actor: Actor, guild_id: str, daily_limit: int | None) -> None:
        actor = validate.actor(actor)
        guild_id = validate.ident("guild", guild_id)
        await self.audit.require_admin(actor, "set_guild_limit", guild_id)
        _check_limit(daily_limit)
        async with self.db.session() as s:
            await self._set_limit(s, actor.platform, "guild", guild_id, daily_limit)
            self.audit.record(s, actor, "set_guild_limit", f"guild:{guild_id}", {"daily_limit": daily_limit})

    async def set_role_limit(self, actor: Actor, place: Place, role_id: str, daily_limit: int | None) -> None:
        """A role's daily limit in the place's guild (None removes it). Users get the highest limit
        of their roles; a per-user limit wins over it (see `Quotas.limit_for`)."""
        actor, place = validate.actor_and_place(actor, place)
        role_id = validate.ident("role", role_id)
        if place.guild_id is None:
            raise BadParameters("guild", "Role limits belong to a server: use this command in one.")
        await self.audit.require_admin(actor, "set_role_limit", f"role:{role_id}")
        _check_limit(daily_limit)
        scope_id = role_scope_id(place.guild_id, role_id)
        if len(scope_id) > validate.MAX_ID_CHARS:
            raise BadParameters("role", f"The role id {role_id[:40]!r} is too long.", role_id)
        async with self.db.session() as s:
            await self._set_limit(s, actor.platform, "role", scope_id, daily_limit)
            self.audit.record(
                s,
                actor,
                "set_role_limit",
                f"role:{role_id}",
                {"guild_id": place.guild_id, "daily_limit": daily_limit},
            )

    async def grant_credits(self, actor: Actor, target_user_id: str, amount: int) -> QuotaView:
        actor = validate.actor(actor)
        target_user_id = validate.ident("user", target_user_id)
        await self.audit.require_admin(actor, "grant_credits", target_user_id)
        if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= MAX_GRANT:
            raise BadParameters(
                "amount", f"Credits must be a whole number from 1 to {MAX_GRANT}, got {amount!r}.", amount
            )
        async with self.db.session() as s:
            user = await self.quotas.lock_user(s, actor.platform, target_user_id)
            user.bonus_credits += amount
            self.audit.record(
                s,
                actor,
                "grant_credits",
                f"user:{target_user_id}",
                {"amount": amount, "balance": user.bonus_credits},
            )
            await s.flush()
            return await self.quotas.view(s, actor.platform, target_user_id, None)

    async def reset_usage(self, actor: Actor, target_user_id: str) -> QuotaView:
        actor = validate.actor(actor)
        target_user_id = validate.ident("user", target_user_id)
        await self.audit.require_admin(actor, "reset_usage", target_user_id)
        period, _, _ = self.quotas.period_for(self.clock())
        async with self.db.session() as s:
            user = await self.quotas.lock_user(s, actor.platform, target_user_id)
            usage = await self.quotas.usage_in(s, user.id, period)
            before = usage.images_used if usage else 0
            if usage is not None:
                usage.images_used = 0
            self.audit.record(s, actor, "reset_usage", f"user:{target_user_id}", {"used_before": before})
            await s.flush()
            return await self.quotas.view(s, actor.platform, target_user_id, None)

    async def ban(self, actor: Actor, target_user_id: str, reason: str = "") -> None:
        actor = validate.actor(actor)
        target_user_id = validate.ident("user", target_user_id)
        reason = validate.text("reason", reason, max_chars=validate.MAX_REASON_CHARS, what="The ban reason")
        await self.audit.require_admin(actor, "ban", target_user_id)
        if target_user_id == actor.user_id:
            raise BadParameters("user", "You cannot ban yourself.", target_user_id)
        async with self.db.session() as s:
            user = await self.quotas.lock_user(s, actor.platform, target_user_id)
            user.banned = True
            user.ban_reason = reason
            self.audit.record(s, actor, "ban", f"user:{target_user_id}", {"reason": reason})

    async def unban(self, actor: Actor, target_user_id: str) -> None:
        actor = validate.actor(actor)
        target_user_id = validate.ident("user", target_user_id)
        await self.audit.require_admin(actor, "unban", target_user_id)
        async with self.db.session() as s:
            user = await self.quotas.lock_user(s, actor.platform, target_user_id)
            user.banned = False
            user.ban_reason = ""
            self.audit.record(s, actor, "unban", f"user:{target_user_id}", {})

    async def audit_log(self, actor: Actor, limit: int = 20) -> list[AuditEntry]:
        actor = validate.actor(actor)
        limit = validate.count("limit", limit, 1, MAX_AUDIT_PAGE)
        await self.audit.require_admin(actor, "audit_log")
        return await self.audit.latest(actor.platform, limit)

    async def _set_limit(
        self, s: AsyncSession, platform: str, scope: str, scope_id: str, limit: int | None
    ) -> None:
        row = (
            await s.execute(
                select(QuotaLimit).where(
                    QuotaLimit.platform == platform,
                    QuotaLimit.scope == scope,
                    QuotaLimit.scope_id == scope_id,
                )
            )
        ).scalar_one_or_none()
        if limit is None:
            if row is not None:
                await s.delete(row)
        elif row is None:
            s.add(
                QuotaLimit(
                    platform=platform,
                    scope=scope,
                    scope_id=scope_id,
                    daily_limit=limit,
                    updated_at=self.clock(),
                )
            )
        else:
            row.daily_limit = limit


def _check_limit(limit: int | None) -> None:
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_DAILY_LIMIT
    ):
        raise BadParameters(
            "limit",
            f"The daily limit must be a whole number from 0 to {MAX_DAILY_LIMIT}, got {limit!r}.",
            limit,
        )
