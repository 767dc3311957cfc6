"""The queue's order, and the queue positions users are told.

Fair order: a queued job's rank is (jobs of its user now running) + (its place among its user's
queued jobs); lowest rank first, then the user served least recently, then the oldest job. One
user's burst of 20 therefore interleaves with everybody else's jobs instead of starving them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.db import Database, rows_matched
from bot.core.models import Job, User

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# Queue positions are reported for the first jobs only: past this, "you are far back" is all a
# user can use, and each report is a database write and a chat message edit.
MAX_REPORTED_POSITION = 50


class FairQueue:
    def __init__(self, db: Database, *, clock: Callable[[], dt.datetime]):
        self.db = db
        self.clock = clock

    async def order(self, s: AsyncSession, platforms: Sequence[str] | None, limit: int) -> list[int]:
        """Ids of the queued jobs due now, in dispatch order, at most `limit`."""
        now = self.clock()
        running = (
            select(Job.user_id.label("user_id"), func.count().label("n"))
            .where(Job.state == "running")
            .group_by(Job.user_id)
            .subquery()
        )
        conds = [Job.state == "queued", or_(Job.not_before.is_(None), Job.not_before <= now)]
        if platforms is not None:
            conds.append(Job.platform.in_(platforms))
        queued = (
            select(
                Job.id.label("id"),
                Job.user_id.label("user_id"),
                func.row_number().over(partition_by=Job.user_id, order_by=Job.id).label("rn"),
            )
            .where(*conds)
            .subquery()
        )
        rank = queued.c.rn + func.coalesce(running.c.n, 0)
        # Among equal ranks, the user served least recently goes first (never served: first of all).
        served = func.coalesce(User.last_dispatched_at, EPOCH)
        q = (
            select(queued.c.id)
            .select_from(
                queued.outerjoin(running, running.c.user_id == queued.c.user_id).join(
                    User, User.id == queued.c.user_id
                )
            )
            .order_by(rank, served, queued.c.id)
            .limit(limit)
        )
        return list((await s.execute(q)).scalars().all())

    async def positions_to_report(self, platforms: Sequence[str], *, only_new: bool) -> list[tuple[int, int]]:
        """(job id, position) of the jobs of `platforms` among the first `MAX_REPORTED_POSITION`
        whose position changed since it was last reported (`only_new`: that were never reported),
        recorded as reported. Of several processes asking at once, one gets each change."""
        if only_new:
            async with self.db.read() as s:
                fresh = (
                    await s.execute(
                        select(Job.id)
                        .where(
                            Job.state == "queued",
                            Job.notified_position.is_(None),
                            Job.platform.in_(platforms),
                        )
                        .limit(1)
                    )
                ).first()
            if fresh is None:
                return []
        changed: list[tuple[int, int]] = []
        async with self.db.session() as s:
            order = await self.order(s, None, MAX_REPORTED_POSITION)
            if not order:
                return []
            current = dict(
                (await s.execute(select(Job.id, Job.notified_position).where(Job.id.in_(order))))
                .tuples()
                .all()
            )
            for position, job_id in enumerate(order, start=1):
                known = current.get(job_id)
                if known == position or (only_new and known is not None):
                    continue
                result = await s.execute(
                    update(Job)
                    .where(
                        Job.id == job_id,
                        Job.state == "queued",
                        Job.platform.in_(platforms),
                        or_(Job.notified_position.is_(None), Job.notified_position != position),
                    )
                    .values(notified_position=position)
                )
                if rows_matched(result) == 1:
                    changed.append((job_id, position))
        return changed
