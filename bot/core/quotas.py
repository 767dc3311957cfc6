"""The quota ledger: periods, limits, charges and refunds.

Every change to a user's quota (a submission's charge, a refund, an admin's reset or credits) runs
in a transaction that holds the user's lock (`lock_user`; a batch of submissions locks all its
users at once, `bot.core.submit_batch`), so the quota is exact under any concurrency. A user's allowance is the per-user limit an admin set, else the highest limit set for
one of the user's roles in the guild (the roles the adapter sent with the request), else the
guild/workspace default, else `[quotas] daily_limit`; bonus credits are spent after it.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot.config import QuotaConfig
from bot.core import tagged_reads
from bot.core.api import LimitSource, QuotaExceeded, QuotaView
from bot.core.bulk import execute_rows, from_rows, one_of_param
from bot.core.db import Database
from bot.core.models import Job, QuotaLimit, QuotaUsage, User
from bot.core.tagged_reads import DAY, I0, I1, T0, T1, T2, TaggedRows

# The tags of the quota book's rows in a batch's merged read (`Quotas.book_read`).
LIMITS = "limits"
USAGE = "usage"


def role_scope_id(guild_id: str, role_id: str) -> str:
    """A role limit's `QuotaLimit.scope_id`: roles belong to a guild (on Discord the guild's id is
    also its @everyone role's id)."""
    return f"{guild_id}/{role_id}"


@dataclass(frozen=True)
class Charge:
    """What a job was charged: `daily` images of the period `period`, then `credits` bonus credits."""

    period: dt.date
    daily: int
    credits: int


class Quotas:
    def __init__(self, db: Database, config: QuotaConfig, clock: Callable[[], dt.datetime]):
        self.db = db
        self.config = config
        self.clock = clock
        self._last_period: tuple[dt.date, dt.datetime, dt.datetime] | None = None

    def period_for(self, now: dt.datetime) -> tuple[dt.date, dt.datetime, dt.datetime]:
        """(period day, period start, reset time) for `now`; the day starts at reset_hour_utc."""
        last = self._last_period
        if last is not None and last[1] <= now < last[2]:
            return last  # every charge of a batch asks, nearly always of the same day
        hour = self.config.reset_hour_utc
        shifted = now.astimezone(dt.UTC) - dt.timedelta(hours=hour)
        day = shifted.date()
        start = dt.datetime(day.year, day.month, day.day, hour, tzinfo=dt.UTC)
        self._last_period = (day, start, start + dt.timedelta(days=1))
        return self._last_period

    async def lock_user(
        self, s: AsyncSession, platform: str, user_id: str, display_name: str | None = None
    ) -> User:
        """Create the user row if needed and lock it for this transaction, in one statement:
        `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` locks the row on PostgreSQL like
        `SELECT ... FOR UPDATE` (SQLite transactions here hold the database write lock anyway)."""
        insert = pg_insert if self.db.is_postgres else sqlite_insert
        now = self.clock()
        values = insert(User).values(
            platform=platform,
            platform_user_id=user_id,
            display_name=display_name or "",
            is_admin=False,
            banned=False,
            ban_reason="",
            bonus_credits=0,
            created_at=now,
            updated_at=now,
        )
        # The update must touch a column for the row to be locked and returned; keep the display
        # name fresh when the adapter sent one, else rewrite the platform with itself.
        changes = (
            {"display_name": values.excluded.display_name}
            if display_name
            else {"platform": values.excluded.platform}
        )
        upsert = values.on_conflict_do_update(
            index_elements=["platform", "platform_user_id"], set_=changes
        ).returning(User)
        query = select(User).from_statement(upsert).execution_options(populate_existing=True)
        return (await s.execute(query)).scalar_one()

    async def limit_for(
        self,
        s: AsyncSession,
        platform: str,
        user_id: str,
        guild_id: str | None,
        role_ids: Sequence[str] = (),
    ) -> tuple[int, LimitSource]:
        """The user's daily limit: the per-user override, else the highest limit of their roles in
        the guild, else the guild's default, else `[quotas] daily_limit`."""
        conds = [(QuotaLimit.scope == "user") & (QuotaLimit.scope_id == user_id)]
        if guild_id is not None:
            conds.append((QuotaLimit.scope == "guild") & (QuotaLimit.scope_id == guild_id))
            if role_ids:
                keys = [role_scope_id(guild_id, r) for r in role_ids]
                conds.append((QuotaLimit.scope == "role") & QuotaLimit.scope_id.in_(keys))
        rows = (
            await s.execute(
                select(QuotaLimit.scope, QuotaLimit.daily_limit).where(
                    QuotaLimit.platform == platform, or_(*conds)
                )
            )
        ).all()
        return self._pick_limit(rows)

    def _pick_limit(self, rows: Iterable[tuple[str, int]]) -> tuple[int, LimitSource]:
        """The limit that applies among the (scope, limit) rows that concern one user."""
        by_scope: dict[str, int] = {}
        for scope, limit in rows:
            # Several roles: the highest limit wins (a role grants an allowance, never takes one).
            by_scope[scope] = max(limit, by_scope.get(scope, limit))
        for scope in ("user", "role", "guild"):
            if scope in by_scope:
                return by_scope[scope], cast(LimitSource, scope)
        return self.config.daily_limit, "global"

    async def usage_in(self, s: AsyncSession, user_pk: int, period: dt.date) -> QuotaUsage | None:
        """The user's usage row of `period` (None before the first charge in it)."""
        return (
            await s.execute(
                select(QuotaUsage)
                .where(QuotaUsage.user_id == user_pk, QuotaUsage.period == period)
                .execution_options(populate_existing=True)
            )
        ).scalar_one_or_none()

    def book_read(
        self, asks: Sequence[QuotaAsk], periods: Iterable[dt.date]
    ) -> tuple[Sequence[Any], dict[str, Any]]:
        """The quota book's part of a batch's merged read (`bot.core.tagged_reads`;
        `bot.core.submit_batch`): its tagged selects, built once, and their parameters: the limits
        that concern the batch's users and their usage in `periods`. `book_of` makes the
        `QuotaBook` of its rows."""
        guilds = {a.guild_id for a in asks if a.guild_id is not None}
        roles = {role_scope_id(a.guild_id, r) for a in asks if a.guild_id is not None for r in a.role_ids}
        params = {
            "quota_platforms": list({a.platform for a in asks}),
            "quota_user_ids": list({a.user_id for a in asks}),
            "quota_guilds": list(guilds),
            "quota_roles": list(roles),
            "quota_pks": list({a.user_pk for a in asks}),
            "quota_periods": list(set(periods)),
        }
        return self._book_parts(bool(guilds), bool(roles)), params

    def book_of(self, rows: TaggedRows, credits: Mapping[int, int]) -> QuotaBook:
        """The `QuotaBook` of `book_read`'s rows. `credits`: each user's bonus credits, read with
        the user's lock, which the caller holds for every user of the read (their charges are then
        exact)."""
        return QuotaBook(
            self,
            {(row[T0], row[T1], row[T2]): row[I0] for row in rows[LIMITS]},
            {(row[I0], row[DAY]): row[I1] for row in rows[USAGE]},
            dict(credits),
        )

    # `book_read`'s selects, built once with their values as parameters, as the claims' are (a
    # statement built per batch is also a cache key computed per batch); one per combination of
    # guild and role limits to look for (a batch from DMs has neither).
    @functools.cache  # noqa: B019 - one Quotas per service, which lives as long as the process
    def _book_parts(self, guilds: bool, roles: bool) -> tuple[Any, ...]:
        pg = self.db.is_postgres
        limits = cast(Table, QuotaLimit.__table__)
        conds = [(limits.c.scope == "user") & one_of_param(limits.c.scope_id, "quota_user_ids", postgres=pg)]
        if guilds:
            conds.append(
                (limits.c.scope == "guild") & one_of_param(limits.c.scope_id, "quota_guilds", postgres=pg)
            )
        if roles:
            conds.append(
                (limits.c.scope == "role") & one_of_param(limits.c.scope_id, "quota_roles", postgres=pg)
            )
        limit_rows = tagged_reads.part(
            LIMITS, ints=[limits.c.daily_limit], texts=[limits.c.platform, limits.c.scope, limits.c.scope_id]
        ).where(one_of_param(limits.c.platform, "quota_platforms", postgres=pg), or_(*conds))
        usage = cast(Table, QuotaUsage.__table__)
        usage_rows = tagged_reads.part(
            USAGE, ints=[usage.c.user_id, usage.c.images_used], day=usage.c.period
        ).where(
            one_of_param(usage.c.user_id, "quota_pks", postgres=pg),
            one_of_param(usage.c.period, "quota_periods", postgres=pg),
        )
        return limit_rows, usage_rows

    async def refund(self, s: AsyncSession, job: Job, user: User) -> None:
        """Give back what the job was charged (caller holds the user lock). Once per job; the daily
        part only while its period lasts (a new period has a fresh allowance anyway)."""
        if job.refunded:
            return
        job.refunded = True
        period, _, _ = self.period_for(self.clock())
        if job.quota_daily and job.quota_period == period:
            usage = await self.usage_in(s, user.id, period)
            if usage is not None:
                usage.images_used = max(0, usage.images_used - job.quota_daily)
        if job.quota_credits:
            user.bonus_credits += job.quota_credits

    async def view(
        self,
        s: AsyncSession,
        platform: str,
        user_id: str,
        guild_id: str | None,
        role_ids: Sequence[str] = (),
    ) -> QuotaView:
        period, _, reset_at = self.period_for(self.clock())
        user = (
            await s.execute(
                select(User)
                .where(User.platform == platform, User.platform_user_id == user_id)
                .execution_options(populate_existing=True)
            )
        ).scalar_one_or_none()
        limit, source = await self.limit_for(s, platform, user_id, guild_id, role_ids)
        used = 0
        credits = 0
        banned = False
        if user is not None:
            usage = await self.usage_in(s, user.id, period)
            used = usage.images_used if usage else 0
            credits = user.bonus_credits
            banned = user.banned
        remaining_today = max(0, limit - used)
        return QuotaView(
            platform=platform,
            user_id=user_id,
            daily_limit=limit,
            limit_source=source,
            used_today=used,
            remaining_today=remaining_today,
            bonus_credits=credits,
            remaining=remaining_today + credits,
            reset_at=reset_at,
            banned=banned,
        )


@dataclass(frozen=True)
class QuotaAsk:
    """Who a submission of a batch charges, and where (the limits that may apply)."""

    user_pk: int
    platform: str
    user_id: str
    guild_id: str | None
    role_ids: tuple[str, ...] = ()


class QuotaBook:
    """A batch's quotas (`Quotas.book_of`): charged in Python in the batch's order, each submission
    exactly as if it were alone after the ones before it, then written in two statements
    (`write`)."""

    def __init__(
        self,
        quotas: Quotas,
        limits: dict[tuple[str, str, str], int],
        usage: dict[tuple[int, dt.date], int],
        credits: dict[int, int],
    ):
        self.quotas = quotas
        self.limits = limits
        self.usage = usage
        self.credits = credits
        self._usage_changed: set[tuple[int, dt.date]] = set()
        self._credits_changed: set[int] = set()

    def limit_for(self, ask: QuotaAsk) -> int:
        keys = [("user", ask.user_id)]
        if ask.guild_id is not None:
            keys.append(("guild", ask.guild_id))
            keys += [("role", role_scope_id(ask.guild_id, r)) for r in ask.role_ids]
        rows = [
            (scope, self.limits[(ask.platform, scope, scope_id)])
            for scope, scope_id in keys
            if (ask.platform, scope, scope_id) in self.limits
        ]
        return self.quotas._pick_limit(rows)[0]

    def charge(self, ask: QuotaAsk, images: int, now: dt.datetime) -> Charge:
        """Charge `images` to the user of `ask`: the daily allowance first, then bonus credits.
        QuotaExceeded, charging nothing, when both together fall short."""
        period, _, reset_at = self.quotas.period_for(now)
        limit = self.limit_for(ask)
        used = self.usage.get((ask.user_pk, period), 0)
        bonus = self.credits[ask.user_pk]
        remaining_today = max(0, limit - used)
        if images > remaining_today + bonus:
            raise QuotaExceeded(reset_at, images, remaining_today + bonus, limit)
        daily = min(images, remaining_today)
        credits = images - daily
        self.usage[(ask.user_pk, period)] = used + daily
        self._usage_changed.add((ask.user_pk, period))
        if credits:
            self.credits[ask.user_pk] = bonus - credits
            self._credits_changed.add(ask.user_pk)
        return Charge(period, daily, credits)

    async def write(self, s: AsyncSession) -> None:
        """The batch's charges: one upsert of the usage rows, one update of the credits spent."""
        if self._usage_changed:
            rows = [
                {"user_id": pk, "period": period, "images_used": self.usage[(pk, period)]}
                for pk, period in sorted(self._usage_changed)
            ]
            pg = self.quotas.db.is_postgres
            await execute_rows(s, _upsert_usage(pg), rows)
        if self._credits_changed:
            users = cast(Table, User.__table__)
            await s.execute(
                update(users).where(users.c.id == bindparam("pk")).values(bonus_credits=bindparam("credits")),
                [{"pk": pk, "credits": self.credits[pk]} for pk in sorted(self._credits_changed)],
            )


USAGE_ROW_COLUMNS = ("user_id", "period", "images_used")


@functools.cache
def _upsert_usage(postgres: bool) -> Any:
    """A batch's usage rows written (`QuotaBook.write`; `bot.core.bulk`)."""
    usage = cast(Table, QuotaUsage.__table__)
    values = from_rows(
        (pg_insert if postgres else sqlite_insert)(usage), usage, USAGE_ROW_COLUMNS, postgres=postgres
    )
    return values.on_conflict_do_update(
        index_elements=["user_id", "period"], set_={"images_used": values.excluded.images_used}
    )
