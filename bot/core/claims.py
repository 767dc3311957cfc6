"""Claims on jobs: how a dispatcher takes a job, keeps it, and hands it back.

- A claim is atomic and takes several jobs in one round trip: `UPDATE ... WHERE id IN (the first
  queued jobs in fair order) AND state = 'queued' RETURNING id`; PostgreSQL locks the chosen rows
  `FOR UPDATE SKIP LOCKED` (concurrent claims take different jobs, none waits), SQLite runs the claim
  transaction `BEGIN IMMEDIATE`. Several processes (Discord, Slack, playground, replicas, extra
  dispatchers) can share one database.
- A claim is a lease (`lease_owner`, `lease_until`), renewed while the job runs. A job whose holder
  died (lease expired) is taken over by anyone; so is a finished job whose outcome was not delivered
  yet, which its new holder delivers.
- Every write here names the owner (a dispatcher's id, "host:pid:nonce") and changes only what that
  owner holds, or may take.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, case, func, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.backends.base import Task
from bot.core.api import JobView
from bot.core.bulk import one_of, one_of_param
from bot.core.db import Database, rows_matched
from bot.core.fair_queue import FairQueue
from bot.core.models import Job, User
from bot.core.views import JobColumns, job_view, view_of

JOBS = cast(Table, Job.__table__)
USERS = cast(Table, User.__table__)


@dataclass(frozen=True)
class ClaimedJob:
    """A job as its holder runs it: its view, and the inputs the view does not show."""

    view: JobView
    task: Task
    strength: float | None
    image_key: str | None
    mask_key: str | None
    # Read with the claim (see `Claims.priority`); None for a job taken over, asked for later.
    priority: int | None = None


@dataclass(frozen=True)
class Reasserted:
    """What `Claims.reassert` handed back: running jobs requeued, outcomes left to deliver now."""

    requeued: int
    to_deliver: int


class Claims:
    def __init__(self, db: Database, queue: FairQueue, *, lease_s: float, clock: Callable[[], dt.datetime]):
        self.db = db
        self.queue = queue
        self.lease_s = lease_s
        self.clock = clock

    def _lease_until(self) -> dt.datetime:
        return self.clock() + dt.timedelta(seconds=self.lease_s)

    async def claim_queued(self, owner: str, platforms: Sequence[str], want: int) -> list[ClaimedJob]:
        """Claim up to `want` queued jobs of `platforms` in fair order: one `UPDATE ... RETURNING`
        over the first entries of the fair-order index (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so
        dispatchers claiming at the same moment take different jobs), then one read of the views."""
        now = self.clock()
        claim, views = self._claim_statements()
        async with self.db.session() as s:
            taken = (
                (
                    await s.execute(
                        claim,
                        {
                            "now": now,
                            "platforms": list(platforms),
                            "limit": want,
                            "claim_owner": owner,
                            "claim_lease_until": self._lease_until(),
                        },
                    )
                )
                .scalars()
                .all()
            )
            if not taken:
                return []
            rows = (await s.execute(views, {"ids": list(taken)})).all()
            return [
                claimed_job(view_of(row, row.owner_id, row.owner_name), row, priority=row.ahead)
                for row in rows
            ]

    @functools.cache  # noqa: B019 - one Claims per service, which lives as long as the process
    def _claim_statements(self) -> tuple[Any, Any]:
        """The claim and the read of the claimed jobs' views, built once with their values as
        parameters: building them (the views read names every column) and their cache keys cost
        about 2 ms per claim, more than the database's work on a claim of a few jobs."""
        now = bindparam("now", type_=JOBS.c.started_at.type)
        first = self.queue.first_due()
        if self.db.is_postgres:
            # MATERIALIZED: the locking SELECT runs once. As a plain subquery the planner may run
            # it again per row, each time skipping the rows it locked before: it took them all.
            picked = first.with_for_update(skip_locked=True).cte("picked").prefix_with("MATERIALIZED")
        else:
            picked = first.cte("picked")
        claim = (
            update(JOBS)
            .where(JOBS.c.id == picked.c.id, JOBS.c.state == "queued")
            .values(
                state="running",
                lease_owner=bindparam("claim_owner", type_=JOBS.c.lease_owner.type),
                lease_until=bindparam("claim_lease_until", type_=JOBS.c.lease_until.type),
                started_at=func.coalesce(JOBS.c.started_at, now),
                attempts=JOBS.c.attempts + 1,
                notified_position=None,
            )
            .returning(JOBS.c.id)
        )
        # Core, not ORM: the claimed jobs are read once to build their views, and ORM objects
        # (identity map, instance state) cost more to build than the views themselves.
        older = JOBS.alias("older")
        priority = (
            select(func.count())
            .where(older.c.user_id == JOBS.c.user_id, older.c.state == "running", older.c.id < JOBS.c.id)
            .correlate(JOBS)
            .scalar_subquery()
        )
        views = (
            select(
                *JOBS.c,
                USERS.c.platform_user_id.label("owner_id"),
                USERS.c.display_name.label("owner_name"),
                priority.label("ahead"),
            )
            .join(USERS, JOBS.c.user_id == USERS.c.id)
            .where(one_of_param(JOBS.c.id, "ids", postgres=self.db.is_postgres))
            .order_by(JOBS.c.fair_round, JOBS.c.id)
        )
        return claim, views

    async def take_over_expired(
        self, owner: str, platforms: Sequence[str], working_on: Collection[int]
    ) -> tuple[int, str | None] | None:
        """Take over one job whose lease has expired: a running one, or a finished one not yet
        delivered. Returns (its id, the owner it is taken from), or None when there is none."""
        now = self.clock()
        expired = and_(
            Job.platform.in_(platforms),
            Job.lease_until < now,
            # Not a job this dispatcher still works on (its lease may have lapsed in a stall).
            Job.id.not_in(list(working_on)) if working_on else true(),
            or_(
                Job.state == "running",
                and_(Job.state.in_(("succeeded", "failed")), Job.delivered_at.is_(None)),
            ),
        )
        async with self.db.session() as s:
            q = select(Job.id, Job.lease_owner).where(expired).order_by(Job.id).limit(1)
            if self.db.is_postgres:
                q = q.with_for_update(skip_locked=True)
            row = (await s.execute(q)).first()
            if row is None:
                return None
            job_id, previous = row
            result = await s.execute(
                update(Job)
                .where(Job.id == job_id, expired)
                .values(
                    lease_owner=owner,
                    lease_until=self._lease_until(),
                    attempts=Job.attempts + case((Job.state == "running", 1), else_=0),
                )
            )
            if rows_matched(result) != 1:
                return None
        return job_id, previous

    async def load(self, job_id: int) -> ClaimedJob:
        async with self.db.read() as s:
            job = await s.get(Job, job_id)
            assert job is not None, f"claimed job {job_id} has no row"  # jobs are never deleted
            return await _claimed_job(s, job)

    async def priority(self, job_id: int) -> int:
        """The fair order carried to the inference server: the number of this user's older jobs
        still running. A server that admits lower values first (the continuous engine) lets a
        newcomer's first job in before the second job of someone's burst."""
        owner = select(Job.user_id).where(Job.id == job_id).scalar_subquery()
        async with self.db.read() as s:
            ahead = await s.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.user_id == owner, Job.state == "running", Job.id < job_id)
            )
        return int(ahead or 0)

    async def renew(self, owner: str, job_ids: Collection[int]) -> set[int]:
        """Renew the leases of `job_ids`; returns those `owner` still holds (another dispatcher
        may have taken one over after a stall)."""
        ids = list(job_ids)
        pg = self.db.is_postgres
        async with self.db.session() as s:
            await s.execute(
                update(Job)
                .where(one_of(Job.id, ids, postgres=pg), Job.lease_owner == owner)
                .values(lease_until=self._lease_until())
            )
            return set(
                (
                    await s.execute(
                        select(Job.id).where(one_of(Job.id, ids, postgres=pg), Job.lease_owner == owner)
                    )
                ).scalars()
            )

    async def requeue(self, owner: str, job_id: int, delay_s: float) -> None:
        """Back to the queue, not to be claimed again for `delay_s` (a retry after a failure)."""
        async with self.db.session() as s:
            await s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
                .values(
                    state="queued",
                    lease_owner=None,
                    lease_until=None,
                    not_before=self.clock() + dt.timedelta(seconds=delay_s),
                    fair_round=self.queue.front(),
                )
            )

    async def reassert(self, owner: str, working_on: Collection[int]) -> Reasserted:
        """After a database failure: renew the leases of the jobs `owner` still works on, and hand
        back at once the ones it holds but no longer works on (a task that ended on the error, a
        claim whose commit went through though its answer was lost), so that nobody waits out a
        lease and no job runs twice."""
        ids = list(working_on)
        mine = [Job.lease_owner == owner]
        if ids:
            mine.append(Job.id.not_in(ids))
        async with self.db.session() as s:
            if ids:
                await s.execute(
                    update(Job)
                    .where(Job.id.in_(ids), Job.lease_owner == owner)
                    .values(lease_until=self._lease_until())
                )
            requeued = await s.execute(
                update(Job)
                .where(*mine, Job.state == "running")
                .values(state="queued", lease_owner=None, lease_until=None, fair_round=self.queue.front())
            )
            if rows_matched(requeued):
                await self.queue.announce(s)
            to_deliver = await s.execute(
                update(Job)
                .where(*mine, Job.state.in_(("succeeded", "failed")), Job.delivered_at.is_(None))
                .values(lease_until=self.clock())
            )
        return Reasserted(rows_matched(requeued), rows_matched(to_deliver))

    async def release_all(self, owner: str) -> None:
        """On a clean stop: running jobs back to the queue at once (the attempt does not count),
        undelivered outcomes free for anyone to deliver now."""
        async with self.db.session() as s:
            released = await s.execute(
                update(Job)
                .where(Job.lease_owner == owner, Job.state == "running")
                .values(
                    state="queued",
                    lease_owner=None,
                    lease_until=None,
                    attempts=Job.attempts - 1,
                    fair_round=self.queue.front(),
                )
            )
            if rows_matched(released):
                await self.queue.announce(s)
            await s.execute(
                update(Job)
                .where(Job.lease_owner == owner, Job.delivered_at.is_(None))
                .values(lease_until=self.clock())
            )


async def _claimed_job(s: AsyncSession, job: Job, user: User | None = None) -> ClaimedJob:
    # Only a finished job has images; skip the query for the usual (queued/running) case.
    view = await job_view(s, job, user, images=None if job.state == "succeeded" else ())
    return claimed_job(view, job)


def claimed_job(view: JobView, job: JobColumns, *, priority: int | None = None) -> ClaimedJob:
    """`job` (an ORM row or a Core row of the jobs table) as its holder runs it."""
    return ClaimedJob(
        view,
        job.params.get("task", "txt2img"),
        job.params.get("strength"),
        job.input_image_key,
        job.mask_key,
        priority,
    )
