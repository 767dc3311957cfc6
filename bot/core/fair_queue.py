"""The queue's order, its admission limit, and the queue positions users are told.

Fair order: every job gets a round when it is submitted, `jobs.fair_round`, and queued jobs run by
(round, id). A job's round is the round being served now (the lowest queued round, or the highest
running one) unless its user already has a job queued or running in that round or later, in which
case it is the round after that user's last one. One user's burst of 20 therefore takes 20 rounds
and interleaves with everybody else's jobs instead of starving them: each user's first job runs
before anybody's second. Because the key is fixed at submission and indexed, a claim, a queue
position and the first positions to report read the first index entries instead of ranking every
queued job (see "Submit and dispatch" in docs/bot-core.md).

Admission: `max_queued_jobs` is a limit on load, not a quota. The queue is counted at most every
`queue_depth_check_s` (one count for all the submissions of that moment) and this process adds the
jobs it queued since; submissions of other processes in between are seen at the next count. A
submission the estimate would refuse counts again first, so nobody is refused while there is room.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    String,
    Table,
    Text,
    bindparam,
    case,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from bot.core import tagged_reads
from bot.core.api import Overloaded
from bot.core.bulk import one_of_param
from bot.core.db import Database
from bot.core.models import Job
from bot.core.submit_activity import STORM
from bot.core.tagged_reads import I0, I1, TaggedRows

# Queue positions are reported for the first jobs only: past this, "you are far back" is all a
# user can use, and each report is a database write and a chat message edit.
MAX_REPORTED_POSITION = 50
# The PostgreSQL channel a submission notifies and dispatchers LISTEN on (bot.core.wakeup).
JOBS_CHANNEL = "imagine_jobs"
JOBS = cast(Table, Job.__table__)
# The tags of the admission's rows in a batch's merged read (`FairQueue.admission_read`).
ROUNDS = "rounds"
OWN_ROUNDS = "own_rounds"


class FairQueue:
    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], dt.datetime],
        max_queued: int = 1000,
        depth_check_s: float = 0.25,
        notify: bool = True,
    ):
        self.db = db
        self.clock = clock
        self.max_queued = max_queued
        self.depth_check_s = depth_check_s
        self.notify = notify and db.is_postgres
        self._depth = 0  # queued jobs at the last count, plus the ones this process queued since
        self._counted_at = -float("inf")

    def _due(self, platforms: Sequence[str] | None) -> list[ColumnElement[bool]]:
        now = self.clock()
        conds = [Job.state == "queued", or_(Job.not_before.is_(None), Job.not_before <= now)]
        if platforms is not None:
            conds.append(Job.platform.in_(platforms))
        return conds

    def first(self, platforms: Sequence[str] | None, limit: int) -> Select[int]:
        """The ids of the first `limit` queued jobs due now, in dispatch order (an index range)."""
        return select(Job.id).where(*self._due(platforms)).order_by(Job.fair_round, Job.id).limit(limit)

    def first_due(self) -> Select[int]:
        """`first` with its values as parameters (`now`, `platforms`, `limit`), for a statement
        built once: building a statement and its cache key costs more than running it."""
        now = bindparam("now", type_=Job.__table__.c.not_before.type)
        return (
            select(Job.id)
            .where(
                Job.state == "queued",
                or_(Job.not_before.is_(None), Job.not_before <= now),
                one_of_param(Job.platform, "platforms", postgres=self.db.is_postgres),
            )
            .order_by(Job.fair_round, Job.id)
            .limit(bindparam("limit", type_=Integer))
        )

    async def order(self, s: AsyncSession, platforms: Sequence[str] | None, limit: int) -> list[int]:
        """Ids of the queued jobs due now, in dispatch order, at most `limit`."""
        return list((await s.execute(self.first(platforms, limit))).scalars().all())

    async def count_if_due(self, s: AsyncSession, wanted: int) -> None:
        """In a batch of submissions' transaction, before `admission_of`: count the queue (capped at
        the limit) when the last count is `depth_check_s` old, or when the estimate would refuse
        one of the `wanted` submissions. The estimate only grows between counts (jobs claimed since
        are still in it): one that says "full" is checked by a count before anyone is refused."""
        mono = time.monotonic()
        if self._depth + wanted > self.max_queued or mono - self._counted_at >= self.depth_check_s:
            # Set first: batches meanwhile use the last count instead of counting too.
            self._counted_at = mono
            self._depth = (await s.execute(self._count, {"cap": self.max_queued})).scalar_one()

    def admission_read(
        self, user_pks: Collection[int], *, storm: bool = False
    ) -> tuple[Sequence[Any], dict[str, Any]]:
        """The admission's part of a batch's merged read (`bot.core.tagged_reads`; the batch's
        users' locks held): its tagged selects, built once, and their parameters. `admission_of`
        makes the `Admission` of its rows. On PostgreSQL the read also notifies the dispatchers,
        which hear of it when the batch commits (not at all if it rolls back); `storm`: this
        process is taking a storm of submissions, which they let go first
        (`bot.core.submit_activity`)."""
        params: dict[str, Any] = {"queue_users": list(user_pks)}
        if self.notify:
            params["queue_payload"] = STORM if storm else ""
        return self._admission_parts, params

    def admission_of(self, rows: TaggedRows) -> Admission:
        """The `Admission` of `admission_read`'s rows: the round being served (the lowest queued
        round, or the highest running one) and each user's last active round."""
        [rounds] = rows[ROUNDS]  # one row: two aggregates with no FROM
        serving = max(rounds[I0] or 0, rounds[I1] or 0)
        return Admission(self, serving, {row[I0]: row[I1] for row in rows[OWN_ROUNDS]})

    @functools.cached_property
    def _count(self) -> Any:
        """The queue counted up to the limit (`cap`), built once as the claims' statements are (a
        statement built per batch is also a cache key computed per batch)."""
        queued = select(JOBS.c.id).where(JOBS.c.state == "queued").limit(bindparam("cap", type_=Integer))
        return select(func.count()).select_from(queued.subquery())

    @functools.cached_property
    def _admission_parts(self) -> tuple[Select[Any], ...]:
        """`admission_read`'s selects, built once. ROUNDS is one row whatever the queue (two
        aggregates with no FROM), so its `pg_notify` runs exactly once per read: the notification
        goes in that row, not in a part of as many rows as the batch has users. (`pg_notify`
        returns void, cast to text for the UNION's text column: the empty string.)"""
        head = select(func.min(JOBS.c.fair_round)).where(JOBS.c.state == "queued").scalar_subquery()
        running = select(func.max(JOBS.c.fair_round)).where(JOBS.c.state == "running").scalar_subquery()
        notify = [func.pg_notify(JOBS_CHANNEL, bindparam("queue_payload", type_=String)).cast(Text)]
        rounds = tagged_reads.part(ROUNDS, ints=[head, running], texts=notify if self.notify else [])
        own = (
            tagged_reads.part(OWN_ROUNDS, ints=[JOBS.c.user_id, func.max(JOBS.c.fair_round)])
            .where(
                one_of_param(JOBS.c.user_id, "queue_users", postgres=self.db.is_postgres),
                JOBS.c.state.in_(("queued", "running")),
            )
            .group_by(JOBS.c.user_id)
        )
        return rounds, own

    def front(self) -> ColumnElement[int]:
        """The round of a job handed back to the queue (a retry, a released claim): the round being
        served, where its old id puts it first; its own round if that is lower still."""
        queued = aliased(Job)
        head = select(func.min(queued.fair_round)).where(queued.state == "queued").scalar_subquery()
        return case((head < Job.fair_round, head), else_=Job.fair_round)

    async def announce(self, s: AsyncSession) -> None:
        """Tell other processes' dispatchers (at commit) that jobs went back to the queue."""
        if self.notify:
            await s.execute(select(func.pg_notify(JOBS_CHANNEL, literal(""))))

    async def position(self, s: AsyncSession, job_id: int) -> int | None:
        """The job's place in the fair order (1 = starts next), or None when it is not queued (or
        not due) or lies past `MAX_REPORTED_POSITION`. Reads at most that many index entries."""
        row = (await s.execute(select(Job.fair_round).where(Job.id == job_id, *self._due(None)))).first()
        if row is None:
            return None
        ahead = (
            select(Job.id)
            .where(*self._due(None), tuple_(Job.fair_round, Job.id) < tuple_(row[0], job_id))
            .limit(MAX_REPORTED_POSITION)
            .subquery()
        )
        position = (await s.execute(select(func.count()).select_from(ahead))).scalar_one() + 1
        return position if position <= MAX_REPORTED_POSITION else None

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
        async with self.db.session() as s:
            first = self.first(None, MAX_REPORTED_POSITION).subquery()
            rows = (
                await s.execute(
                    select(Job.id, Job.notified_position)
                    .join(first, first.c.id == Job.id)
                    .order_by(Job.fair_round, Job.id)
                )
            ).all()
            wanted = {
                job_id: position
                for position, (job_id, known) in enumerate(rows, start=1)
                if known != position and not (only_new and known is not None)
            }
            if not wanted:
                return []
            # One statement for all of them; the condition makes each change one process's.
            position = case(wanted, value=Job.id)
            result = await s.execute(
                update(Job)
                .where(
                    Job.id.in_(list(wanted)),
                    Job.state == "queued",
                    Job.platform.in_(platforms),
                    or_(Job.notified_position.is_(None), Job.notified_position != position),
                )
                .values(notified_position=position)
                .returning(Job.id, Job.notified_position)
            )
            changed = [(job_id, pos) for job_id, pos in result.tuples().all() if pos is not None]
        return sorted(changed, key=lambda change: change[1])


class Admission:
    """A batch's admissions (`FairQueue.admission_of`), decided in Python in the batch's order."""

    def __init__(self, queue: FairQueue, serving: int, own: dict[int, int]):
        self.queue = queue
        self.serving = serving
        self.own = own  # each user's last round among its queued and running jobs

    def check_room(self) -> None:
        """Overloaded when the queue is full."""
        if self.queue._depth >= self.queue.max_queued:
            raise Overloaded()

    def admit(self, user_pk: int) -> int:
        """The fair round of the user's new job (the round after its last one, or the round being
        served), once nothing refuses it: a refused submission takes no round and no room."""
        self.queue._depth += 1  # counted before commit: a failed commit only makes it cautious
        last = self.own.get(user_pk)
        fair_round = self.serving if last is None else max(self.serving, last + 1)
        self.own[user_pk] = fair_round
        return fair_round
