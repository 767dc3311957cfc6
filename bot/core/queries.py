"""What adapters read: jobs, a user's history and quota, stored images, and the admins' statistics."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import cast

from sqlalchemy import Table, func, select

from bot.core import validate
from bot.core.api import Actor, JobView, NotFound, Place, QuotaView, StatsView, UserStat
from bot.core.audit import Audit
from bot.core.db import Database
from bot.core.fair_queue import FairQueue
from bot.core.models import ImageRow, Job, User
from bot.core.quotas import Quotas
from bot.core.storage import ImageStorage
from bot.core.views import job_view, view_of

JOBS = cast(Table, Job.__table__)
USERS = cast(Table, User.__table__)
MAX_HISTORY = 100  # one page of history is plenty for a chat message; bigger asks are capped
MAX_TOP_USERS = 25  # a chat message lists them one a line
# Results without a recorded message are looked for among those of the last day: reactions on older
# messages are rare, and the look costs a platform call per candidate.
UNATTACHED_WINDOW_S = 86_400.0


class Queries:
    def __init__(
        self,
        db: Database,
        storage: ImageStorage,
        quotas: Quotas,
        audit: Audit,
        queue: FairQueue,
        *,
        clock: Callable[[], dt.datetime],
    ):
        self.db = db
        self.queue = queue
        self.storage = storage
        self.quotas = quotas
        self.audit = audit
        self.clock = clock

    async def get_job(self, job_id: int) -> JobView:
        job_id = validate.job_id(job_id)
        async with self.db.read() as s:
            job = await s.get(Job, job_id)
            if job is None:
                raise NotFound(f"There is no job {job_id}.")
            return await job_view(s, job)

    async def job_views(self, job_ids: list[int]) -> dict[int, JobView]:
        """Views of several jobs in one query (without images: for queued jobs)."""
        job_ids = [validate.job_id(j) for j in job_ids]
        async with self.db.read() as s:
            # Core rows, not ORM objects: each is read to build its view, nothing more.
            rows = (
                await s.execute(
                    select(*JOBS.c, USERS.c.platform_user_id, USERS.c.display_name)
                    .join(USERS, JOBS.c.user_id == USERS.c.id)
                    .where(JOBS.c.id.in_(job_ids))
                )
            ).all()
        return {row.id: view_of(row, row.platform_user_id, row.display_name) for row in rows}

    async def job_for_message(self, platform: str, message_id: str) -> JobView | None:
        platform = validate.ident("platform", platform, max_chars=validate.MAX_PLATFORM_CHARS)
        message_id = validate.ident("message", message_id, max_chars=validate.MAX_MESSAGE_ID_CHARS)
        async with self.db.read() as s:
            job = (
                await s.execute(
                    select(Job)
                    .where(Job.platform == platform, Job.result_message_id == message_id)
                    .order_by(Job.id.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
            return None if job is None else await job_view(s, job)

    async def queue_position(self, job_id: int) -> int | None:
        """The job's place in the fair order (1 = starts next), or None when it is not queued or
        lies past the positions users are told (`fair_queue.MAX_REPORTED_POSITION`). For the first
        status message an adapter shows; later changes come through `Delivery.on_queued`."""
        job_id = validate.job_id(job_id)
        async with self.db.read() as s:
            return await self.queue.position(s, job_id)

    async def unattached_results(
        self, platform: str, channel_id: str, *, within_s: float = UNATTACHED_WINDOW_S, limit: int = 10
    ) -> list[JobView]:
        """Results delivered in `channel_id` whose message id was never recorded (a Slack share that
        showed up late), newest first, finished within `within_s`: an adapter asked about an unknown
        message looks among these (by their files) before it gives up on it."""
        platform = validate.ident("platform", platform, max_chars=validate.MAX_PLATFORM_CHARS)
        channel_id = validate.ident("channel", channel_id)
        limit = validate.count("limit", limit, 1, 50)
        since = self.clock() - dt.timedelta(seconds=within_s)
        async with self.db.read() as s:
            jobs = (
                (
                    await s.execute(
                        select(Job)
                        .where(
                            Job.platform == platform,
                            Job.channel_id == channel_id,
                            Job.state == "succeeded",
                            Job.delivered_at.is_not(None),
                            Job.result_message_id.is_(None),
                            Job.finished_at >= since,
                        )
                        .order_by(Job.id.desc())
                        .limit(limit)
                    )
                )
                .scalars()
                .all()
            )
            return [await job_view(s, j, images=()) for j in jobs]

    async def image_bytes(self, storage_key: str) -> bytes:
        if not isinstance(storage_key, str):
            raise NotFound("That image is no longer stored.")
        try:
            return await self.storage.get(storage_key)
        except KeyError:
            raise NotFound("That image is no longer stored.") from None

    async def history(self, actor: Actor, limit: int = 10) -> list[JobView]:
        actor = validate.actor(actor)
        limit = validate.count("limit", limit, 1, MAX_HISTORY)
        async with self.db.read() as s:
            user = (
                await s.execute(
                    select(User).where(
                        User.platform == actor.platform, User.platform_user_id == actor.user_id
                    )
                )
            ).scalar_one_or_none()
            if user is None:
                return []
            jobs = (
                (
                    await s.execute(
                        select(Job).where(Job.user_id == user.id).order_by(Job.id.desc()).limit(limit)
                    )
                )
                .scalars()
                .all()
            )
            return [await job_view(s, j, user) for j in jobs]

    async def quota(self, actor: Actor, place: Place) -> QuotaView:
        actor, place = validate.actor_and_place(actor, place)
        async with self.db.read() as s:
            return await self.quotas.view(s, actor.platform, actor.user_id, place.guild_id, actor.role_ids)

    async def stats(self, actor: Actor, place: Place, top: int = 5) -> StatsView:
        actor, place = validate.actor_and_place(actor, place)
        top = validate.count("top", top, 1, MAX_TOP_USERS)
        await self.audit.require_admin(actor, "stats", place.guild_id or "")
        _, start, _ = self.quotas.period_for(self.clock())
        scope = [Job.platform == actor.platform]
        if place.guild_id is not None:
            scope.append(Job.guild_id == place.guild_id)
        async with self.db.session() as s:
            by_state = dict(
                (await s.execute(select(Job.state, func.count()).where(*scope).group_by(Job.state)))
                .tuples()
                .all()
            )
            images_today = (
                await s.execute(
                    select(func.count(ImageRow.id))
                    .join(Job, ImageRow.job_id == Job.id)
                    .where(*scope, ImageRow.created_at >= start)
                )
            ).scalar_one()
            count = func.count(ImageRow.id).label("images")
            top_rows = (
                await s.execute(
                    select(User.platform, User.platform_user_id, User.display_name, count)
                    .select_from(ImageRow)
                    .join(Job, ImageRow.job_id == Job.id)
                    .join(User, Job.user_id == User.id)
                    .where(*scope, ImageRow.created_at >= start)
                    .group_by(User.id, User.platform, User.platform_user_id, User.display_name)
                    .order_by(count.desc(), User.platform_user_id)
                    .limit(top)
                )
            ).all()
            queue_depth = (
                await s.execute(select(func.count()).select_from(Job).where(Job.state == "queued"))
            ).scalar_one()
            self.audit.record(
                s, actor, "stats", f"guild:{place.guild_id}" if place.guild_id else "platform", {}
            )
        return StatsView(
            jobs_by_state={
                state: by_state.get(state, 0)
                for state in ("queued", "running", "succeeded", "failed", "cancelled")
            },
            images_today=images_today,
            top_users=tuple(UserStat(p, u, d, n) for p, u, d, n in top_rows),
            queue_depth=queue_depth,
            period_start=start,
        )
