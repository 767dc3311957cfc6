"""A job's outcome and its delivery, each recorded once.

The holder of a job's claim (a dispatcher, named by its owner id) records the result or the failure,
then each attempt at delivering it and, at last, the delivery; every one of those writes is
conditional on the claim, so a dispatcher that lost its lease changes nothing. An adapter records
the message that shows the result (`attach_result_message`, which also counts the job as
delivered) and what it needs to deliver after a restart (`remember_delivery`).

Each method is one unit of work and safe to run again: callers retry them while the database is
unavailable (`bot.core.db.retry_unavailable`).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core import validate
from bot.core.api import ImageInfo, NotFound
from bot.core.bulk import execute_rows, from_rows, one_of_param
from bot.core.db import Database, retry_unavailable, rows_matched
from bot.core.group_commit import GroupCommit
from bot.core.models import ImageRow, Job, User
from bot.core.quotas import Quotas

IMAGES = cast(Table, ImageRow.__table__)
# Core, not ORM, for the batches' updates: an ORM UPDATE first evaluates its criteria against the
# session's objects (synchronize_session), work a batch of plain rows does not need.
JOBS = cast(Table, Job.__table__)
# Results recorded in one transaction at most: a dispatcher's slots finish at most this many at once.
MAX_BATCH = 256


class Stored(NamedTuple):
    """A job's result to record (`Results.store`)."""

    owner: str
    job_id: int
    images: tuple[ImageInfo, ...]


class Delivered(NamedTuple):
    """A job's delivery to record (`Results.mark_delivered`)."""

    owner: str
    job_id: int
    ok: bool


Record = Stored | Delivered


class Results:
    def __init__(self, db: Database, quotas: Quotas, *, lease_s: float, clock: Callable[[], dt.datetime]):
        self.db = db
        self.quotas = quotas
        self.lease_s = lease_s
        self.clock = clock
        # Results and delivery marks share one group commit, so one transaction records both
        # kinds finished at the same moment: with a fast backend, one job's result is stored while
        # another's delivery is marked, and two group commits took a transaction each.
        self._records: GroupCommit[Record, tuple[dt.datetime, int] | None] = GroupCommit(
            "record results", self._record_batch, max_batch=MAX_BATCH
        )

    def _lease_until(self) -> dt.datetime:
        return self.clock() + dt.timedelta(seconds=self.lease_s)

    # -- the claim holder's records ------------------------------------------------------------

    async def store(
        self, owner: str, job_id: int, images: Sequence[ImageInfo]
    ) -> tuple[dt.datetime, int] | None:
        """Mark the running job succeeded with `images` (already in the image storage) and count
        the first attempt at delivering it, which its holder makes next (one transaction where
        `count_delivery_attempt` would be a second); the claim is kept for the delivery. Returns
        (the finish time, the delivery attempt), or None when `owner` no longer holds the job (its
        result is then someone else's to make). Results finished at the same moment share the
        transaction (`bot.core.group_commit`)."""
        return await self._records(Stored(owner, job_id, tuple(images)))

    async def _record_batch(self, batch: list[Record]) -> list[tuple[dt.datetime, int] | None]:
        stores = [r for r in batch if isinstance(r, Stored)]
        deliveries = [r for r in batch if isinstance(r, Delivered)]
        async with self.db.session() as s:
            stored = await self._store_batch(s, stores) if stores else []
            if deliveries:
                await self._mark_delivered_batch(s, deliveries)
        outcomes = iter(stored)
        return [next(outcomes) if isinstance(r, Stored) else None for r in batch]

    async def _store_batch(
        self, s: AsyncSession, batch: list[Stored]
    ) -> list[tuple[dt.datetime, int] | None]:
        now = self.clock()
        pg = self.db.is_postgres
        attempts: dict[int, int] = {}
        by_owner: dict[str, list[int]] = {}
        for owner, job_id, _ in batch:
            by_owner.setdefault(owner, []).append(job_id)
        for owner, job_ids in by_owner.items():  # one owner, in all but odd test set-ups
            result = await s.execute(
                _store_results(pg),
                {"ids": job_ids, "owner": owner, "now": now, "until": self._lease_until()},
            )
            attempts.update(result.tuples().all())
        rows = [
            {
                "job_id": job_id,
                "index": i.index,
                "seed": i.seed,
                "storage_key": i.storage_key,
                "sha256": i.sha256,
                "size_bytes": i.size_bytes,
                "width": i.width,
                "height": i.height,
                "created_at": now,
            }
            for _, job_id, images in batch
            if job_id in attempts
            for i in images
        ]
        if rows:
            await execute_rows(s, _insert_images(pg), rows)
        return [(now, attempts[job_id]) if job_id in attempts else None for _, job_id, _ in batch]

    async def fail(self, owner: str, job_id: int, message: str) -> bool:
        """Mark the job failed with `message` (short, for the user) and refund its quota, in one
        transaction under the user's lock. False when `owner` no longer holds it."""
        async with self.db.session() as s:
            job = (
                await s.execute(select(Job).where(Job.id == job_id).execution_options(populate_existing=True))
            ).scalar_one()
            if job.lease_owner != owner or job.state not in ("running", "queued"):
                return False
            user = await s.get(User, job.user_id)
            assert user is not None, f"job {job_id} has no user row"  # a foreign key guarantees one
            user = await self.quotas.lock_user(s, user.platform, user.platform_user_id)
            job.state = "failed"
            job.error = message
            job.finished_at = self.clock()
            job.lease_until = self._lease_until()
            await self.quotas.refund(s, job, user)
        return True

    async def count_delivery_attempt(self, owner: str, job_id: int) -> int | None:
        """Count one more attempt at delivering the job's outcome and return the count (1 = the
        first); None when it is delivered already or `owner` no longer holds it."""
        async with self.db.session() as s:
            result = await s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner, Job.delivered_at.is_(None))
                .values(delivery_attempts=Job.delivery_attempts + 1)
                .returning(Job.delivery_attempts)
            )
            return result.scalar_one_or_none()

    async def mark_delivered(self, owner: str, job_id: int, *, ok: bool) -> None:
        """The delivery callback returned (`ok`) or raised: the job is delivered, and released.
        Deliveries finished at the same moment share the transaction."""
        await self._records(Delivered(owner, job_id, ok))

    async def _mark_delivered_batch(self, s: AsyncSession, batch: list[Delivered]) -> None:
        groups: dict[tuple[str, bool], list[int]] = {}
        for owner, job_id, ok in batch:
            groups.setdefault((owner, ok), []).append(job_id)
        for (owner, ok), job_ids in groups.items():
            await s.execute(
                _mark_delivered(self.db.is_postgres),
                {
                    "ids": job_ids,
                    "owner": owner,
                    "now": self.clock(),
                    "failure": None if ok else "delivery callback failed (see log)",
                },
            )

    # -- the adapters' records -----------------------------------------------------------------

    async def attach_result_message(
        self, job_id: int, message_id: str, channel_id: str | None = None
    ) -> None:
        job_id = validate.job_id(job_id)
        message_id = validate.ident("message", message_id, max_chars=validate.MAX_MESSAGE_ID_CHARS)
        channel_id = validate.optional_ident("channel", channel_id, max_chars=validate.MAX_MESSAGE_ID_CHARS)

        async def write() -> None:
            async with self.db.session() as s:
                # A recorded result message means the user has seen the result: count the job as
                # delivered now, so a bot stopped before its delivery callback returned does not
                # post the same result again when the job is taken over after a restart.
                values: dict[str, Any] = {
                    "result_message_id": message_id,
                    "delivered_at": func.coalesce(Job.delivered_at, self.clock()),
                }
                if channel_id is not None:
                    values["result_channel_id"] = channel_id
                result = await s.execute(update(Job).where(Job.id == job_id).values(**values))
                if rows_matched(result) == 0:
                    raise NotFound(f"There is no job {job_id}.")

        # The result is posted already: recording it is worth waiting out a database blip for.
        await retry_unavailable(write, within_s=self.lease_s, what=f"job {job_id}: record result")

    async def record_shown(self, job_id: int) -> None:
        """The result is shown, but the id of the message showing it is not known yet (Slack shares
        an upload asynchronously): count the job as delivered now, so that a restart does not post
        it again; `attach_result_message` adds the message id when it is found."""
        job_id = validate.job_id(job_id)

        async def write() -> None:
            async with self.db.session() as s:
                result = await s.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(delivered_at=func.coalesce(Job.delivered_at, self.clock()))
                )
                if rows_matched(result) == 0:
                    raise NotFound(f"There is no job {job_id}.")

        await retry_unavailable(write, within_s=self.lease_s, what=f"job {job_id}: record shown")

    async def remember_delivery(self, job_id: int, values: Mapping[str, str]) -> None:
        job_id = validate.job_id(job_id)
        merged = validate.delivery({str(k): str(v) for k, v in values.items()})

        async def write() -> None:
            async with self.db.session() as s:
                # Read and write in one transaction (the row is locked on PostgreSQL; SQLite's write
                # transaction is exclusive), so two updates of one job's mapping don't lose each other.
                query = select(Job).where(Job.id == job_id)
                if self.db.is_postgres:
                    query = query.with_for_update()
                job = (await s.execute(query)).scalar_one_or_none()
                if job is None:
                    raise NotFound(f"There is no job {job_id}.")
                # A new dict: SQLAlchemy's JSON column sees a reassignment, not an in-place change.
                job.delivery = {**(job.delivery or {}), **merged}

        await retry_unavailable(write, within_s=self.lease_s, what=f"job {job_id}: remember delivery")


IMAGE_ROW_COLUMNS = (
    "job_id", "index", "seed", "storage_key", "sha256", "size_bytes", "width", "height", "created_at"
)  # fmt: skip


# The batches' updates are built once, with their values as parameters (`bot.core.bulk.
# one_of_param`): building a statement and its cache key costs more than the database's work on a
# small batch.


@functools.cache
def _store_results(postgres: bool) -> Any:
    """Mark the running jobs `ids` that `owner` holds succeeded and count their first delivery
    attempt (see `Results.store`)."""
    return (
        update(JOBS)
        .where(
            one_of_param(JOBS.c.id, "ids", postgres=postgres),
            JOBS.c.lease_owner == bindparam("owner", type_=JOBS.c.lease_owner.type),
            JOBS.c.state == "running",
        )
        .values(
            state="succeeded",
            finished_at=bindparam("now", type_=JOBS.c.finished_at.type),
            error=None,
            lease_until=bindparam("until", type_=JOBS.c.lease_until.type),
            delivery_attempts=JOBS.c.delivery_attempts + 1,
        )
        .returning(JOBS.c.id, JOBS.c.delivery_attempts)
    )


@functools.cache
def _mark_delivered(postgres: bool) -> Any:
    """The jobs `ids` that `owner` holds are delivered (`failure`: why the callback failed, or None),
    and released."""
    return (
        update(JOBS)
        # delivered_at may already be set by attach_result_message (the adapter posted the result);
        # the lease check alone makes this the one holder's update.
        .where(
            one_of_param(JOBS.c.id, "ids", postgres=postgres),
            JOBS.c.lease_owner == bindparam("owner", type_=JOBS.c.lease_owner.type),
        )
        .values(
            delivered_at=func.coalesce(JOBS.c.delivered_at, bindparam("now", type_=JOBS.c.delivered_at.type)),
            delivery_error=bindparam("failure", type_=JOBS.c.delivery_error.type),
            lease_owner=None,
            lease_until=None,
        )
    )


@functools.cache
def _insert_images(postgres: bool) -> Any:
    """A batch's image rows (`bot.core.bulk`)."""
    return from_rows(insert(IMAGES), IMAGES, IMAGE_ROW_COLUMNS, postgres=postgres)
