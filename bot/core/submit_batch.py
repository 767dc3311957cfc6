"""Submissions written together: one transaction for every submission waiting (group commit).

`Submissions.submit` resolves a job's parameters, then hands it here (`bot.core.group_commit`); the
batch's transaction runs a constant number of statements whatever its size (five in the usual
case):

1. one upsert of the batch's users, which locks their rows (PostgreSQL: `INSERT ... ON CONFLICT DO
   UPDATE`, in a fixed order so that two batches never wait for each other in a cycle; SQLite: the
   transaction is `BEGIN IMMEDIATE`, the database's one write lock) and returns their bans and
   credits;
2. one read of everything else the checks need, whose parts are independent of one another
   (`bot.core.tagged_reads`: a `UNION ALL` of tagged rows): the idempotency keys already used, the
   queue's admission (`FairQueue.admission_read`: the fair round being served, each user's last
   round and, on PostgreSQL, the NOTIFY that wakes the dispatchers at commit) and the quota limits
   and usage of the batch's users (`Quotas.book_read`). Each statement costs the event loop
   SQLAlchemy's and the driver's work and on PostgreSQL a round trip, whatever it reads, while
   every submitter of the batch waits: these were five statements. Now and then the queue is
   counted before it (`FairQueue.count_if_due`), and when a key was used already (a retry, rare)
   its job's full row is read after it, for the view;
3. the place rules of each distinct place (usually one);
4. one multi-row INSERT of the jobs, one upsert of the quota usage (and an update of the credits
   spent, when some were).

Between the reads and the writes every submission is decided in Python, in arrival order, with the
same checks and the same order of refusals as one submission alone: the idempotency key, the ban,
moderation, the place, the queue's room, the quota. Quotas stay exact because every user of the
batch is locked for the whole of it; a refusal is that submission's alone.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import Table, case, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core import tagged_reads
from bot.core.api import (
    Actor,
    BadParameters,
    Banned,
    CoreError,
    DatabaseError,
    JobView,
    Moderated,
    Place,
    PlaceRules,
)
from bot.core.bulk import execute_rows, from_rows, one_of_param
from bot.core.db import Database
from bot.core.fair_queue import FairQueue
from bot.core.models import Job, User
from bot.core.moderation import Moderator
from bot.core.place_settings import PlaceSettingsPart
from bot.core.quotas import QuotaAsk, Quotas
from bot.core.tagged_reads import T0, TaggedRows
from bot.core.views import image_infos, view_of

KEY_USED_BY_OTHER = "This request id was already used by someone else."
# The kinds whose prompt is new (the others reuse a prompt that passed moderation already).
NEW_PROMPT_KINDS = ("imagine", "inpaint", "remix")
# A batch's size bounds one transaction's statements (a 500-row INSERT is ~15k parameters, within
# SQLite's limit) and how long the first submission of a batch waits for the last.
MAX_BATCH = 500
# The tag of the keys already used in a batch's merged read (`SubmitWriter._merged_read`).
USED_KEYS = "used_keys"

# Core tables, not ORM classes: a batch writes plain rows (no identity map, no unit of work).
JOBS = cast(Table, Job.__table__)
USERS = cast(Table, User.__table__)
# The columns of a user row `_lock_users` sends.
USER_ROW_COLUMNS = (
    "platform",
    "platform_user_id",
    "display_name",
    "is_admin",
    "banned",
    "ban_reason",
    "bonus_credits",
    "created_at",
    "updated_at",
)


class _RolledBack(Exception):  # noqa: N818 - not an error: how a dry run leaves its transaction
    def __init__(self, outcomes: list[JobView | BaseException]):
        super().__init__("dry run")
        self.outcomes = outcomes


@dataclass(frozen=True)
class PendingJob:
    """A submission whose parameters are resolved, waiting for its batch: the job row's columns
    except those the batch decides (its user, fair round and quota charge)."""

    actor: Actor
    place: Place
    key: str  # "<platform>:<idempotency key>"
    now: dt.datetime
    images: int
    row: dict[str, Any] = field(hash=False)


class SubmitWriter:
    def __init__(
        self,
        db: Database,
        quotas: Quotas,
        queue: FairQueue,
        place_settings: PlaceSettingsPart,
        moderator: Moderator,
        *,
        storming: Callable[[], bool] = lambda: False,
    ):
        self.db = db
        self.storming = storming
        self.quotas = quotas
        self.queue = queue
        self.place_settings = place_settings
        self.moderator = moderator

    async def write(self, batch: list[PendingJob], *, dry_run: bool = False) -> list[JobView | BaseException]:
        """Each submission's view, or its refusal. A database error fails the batch; a conflict
        (another process inserted one of the keys first) is sorted out one submission at a time,
        the loser getting `DatabaseError("conflict")` as it would alone. `dry_run`: every step runs,
        the views included, and the transaction is rolled back (`Submissions.warm_up`)."""
        if dry_run:
            try:
                await self._write(batch, dry_run=True)
            except _RolledBack as done:
                return done.outcomes
            raise AssertionError("a dry run was committed")  # _write raises _RolledBack
        try:
            return await self._write(batch)
        except DatabaseError as e:
            if e.kind != "conflict" or len(batch) == 1:
                raise
        outcomes: list[JobView | BaseException] = []
        for pending in batch:
            try:
                outcomes += await self._write([pending])
            except DatabaseError as e:
                outcomes.append(e)
        return outcomes

    async def _write(
        self, batch: list[PendingJob], *, dry_run: bool = False
    ) -> list[JobView | BaseException]:
        outcomes: list[JobView | BaseException | int] = []  # an int: the index of the batch's row
        rows: list[dict[str, Any]] = []
        async with self.db.session() as s:
            users = await self._lock_users(s, batch)
            asks = [self._ask(p, users) for p in batch]
            user_pks = {u.id for u in users.values()}
            await self.queue.count_if_due(s, len(batch))
            # The keys used, the admission and the quota book: independent reads, one statement
            # (see `bot.core.tagged_reads`), each part turned back into its owner's object.
            queue_parts, queue_params = self.queue.admission_read(user_pks, storm=self.storming())
            quota_parts, quota_params = self.quotas.book_read(
                asks, {self.quotas.period_for(p.now)[0] for p in batch}
            )
            result = await s.execute(
                self._merged_read(queue_parts, quota_parts),
                {"keys": list({p.key for p in batch}), **queue_params, **quota_params},
            )
            read = TaggedRows(result.all())  # all at once: iterating a result fetches row by row
            admission = self.queue.admission_of(read)
            book = self.quotas.book_of(read, {u.id: u.bonus_credits for u in users.values()})
            existing: dict[str, Any] = {}
            if read[USED_KEYS]:
                # A retried event or a key someone else used (rare): their jobs' full rows, for
                # the view a retry returns. Core rows: the view reads their columns as attributes.
                found = [row[T0] for row in read[USED_KEYS]]
                existing = {
                    job.idempotency_key: job for job in await s.execute(self._jobs_of_keys, {"keys": found})
                }
            rules: dict[Place, PlaceRules | CoreError] = {}
            new_keys: dict[str, int] = {}  # keys inserted by this batch: the index of their row
            for pending, ask in zip(batch, asks, strict=True):
                user = users[(pending.actor.platform, pending.actor.user_id)]
                try:
                    job = existing.get(pending.key)
                    if job is not None:
                        # A retried event: the same job, charged nothing.
                        if job.user_id != user.id:
                            raise BadParameters("idempotency_key", KEY_USED_BY_OTHER)
                        images = await image_infos(s, job.id)
                        outcomes.append(
                            view_of(
                                job, user.platform_user_id, user.display_name, created=False, images=images
                            )
                        )
                        continue
                    if pending.key in new_keys:  # two deliveries of one event in one batch
                        if rows[new_keys[pending.key]]["user_id"] != user.id:
                            raise BadParameters("idempotency_key", KEY_USED_BY_OTHER)
                        outcomes.append(-1 - new_keys[pending.key])  # the same job, not created
                        continue
                    if user.banned:
                        raise Banned(user.ban_reason)
                    if pending.row["kind"] in NEW_PROMPT_KINDS:
                        rule = self.moderator.check(pending.row["prompt"])
                        if rule is not None:
                            raise Moderated(rule.description)
                    known = rules.get(pending.place)
                    if known is None:  # read once per place and batch (a coroutine per row cost more)
                        known = rules[pending.place] = await self._read_rules(s, pending.place)
                    if isinstance(known, CoreError):
                        raise known
                    place_rules = known
                    admission.check_room()
                    charge = book.charge(ask, pending.images, pending.now)
                    row = dict(pending.row)
                    if place_rules.private:
                        row["params"] = {**row["params"], "private": True}
                    row.update(
                        user_id=user.id,
                        fair_round=admission.admit(user.id),
                        quota_period=charge.period,
                        quota_daily=charge.daily,
                        quota_credits=charge.credits,
                    )
                    new_keys[pending.key] = len(rows)
                    outcomes.append(len(rows))
                    rows.append(row)
                except CoreError as e:
                    outcomes.append(e)
            ids: dict[str, int] = {}
            if rows:
                # Matched back by key: a multi-row INSERT's RETURNING order is not guaranteed.
                inserted = await execute_rows(s, self._insert_jobs(tuple(rows[0])), rows)
                ids = {key: job_id for job_id, key in inserted}
                await book.write(s)
            if dry_run:
                raise _RolledBack(self._views(outcomes, rows, ids, users))
        return self._views(outcomes, rows, ids, users)

    @staticmethod
    def _views(
        outcomes: list[JobView | BaseException | int],
        rows: list[dict[str, Any]],
        ids: dict[str, int],
        users: dict[tuple[str, str], Any],
    ) -> list[JobView | BaseException]:
        """Each submission's view (its row as inserted, `ids` by key) or its refusal."""
        owners = {user.id: user for user in users.values()}
        views: list[JobView | BaseException] = []
        for outcome in outcomes:
            if isinstance(outcome, int):
                row = rows[outcome if outcome >= 0 else -1 - outcome]
                owner = owners[row["user_id"]]
                # The row as the view reads it (an ORM object costs more to build than the insert).
                inserted_job = SimpleNamespace(**row, id=ids[row["idempotency_key"]])
                views.append(
                    view_of(inserted_job, owner.platform_user_id, owner.display_name, created=outcome >= 0)
                )
            else:
                views.append(outcome)
        return views

    async def _lock_users(self, s: AsyncSession, batch: Sequence[PendingJob]) -> dict[tuple[str, str], Any]:
        """Create the batch's users as needed and lock their rows, in one statement (see `Quotas.
        lock_user`); the display name and admin flag are the last ones the batch sent."""
        latest: dict[tuple[str, str], Actor] = {}
        names: dict[tuple[str, str], str] = {}
        for pending in batch:
            actor = pending.actor
            latest[(actor.platform, actor.user_id)] = actor
            if actor.display_name:
                names[(actor.platform, actor.user_id)] = actor.display_name
        now = batch[0].now
        rows = [
            {
                "platform": platform,
                "platform_user_id": user_id,
                "display_name": names.get((platform, user_id), ""),
                "is_admin": bool(actor.is_admin),
                "banned": False,
                "ban_reason": "",
                "bonus_credits": 0,
                "created_at": now,
                "updated_at": now,
            }
            # Sorted: every batch locks users in the same order, so two never deadlock.
            for (platform, user_id), actor in sorted(latest.items())
        ]
        return {
            (u.platform, u.platform_user_id): u for u in await execute_rows(s, self._upsert_users(), rows)
        }

    @functools.cache  # noqa: B019 - one writer per service, which lives as long as the process
    def _insert_jobs(self, names: tuple[str, ...]) -> Any:
        """The jobs of a batch (`bot.core.bulk`); `names`: the rows' keys (every row has the same:
        `Submissions.submit` writes every column)."""
        return from_rows(insert(JOBS), JOBS, names, postgres=self.db.is_postgres).returning(
            JOBS.c.id, JOBS.c.idempotency_key
        )

    @functools.cache  # noqa: B019 - as above
    def _merged_read(self, queue_parts: Sequence[Any], quota_parts: Sequence[Any]) -> Any:
        """The batch's reads after its users' upsert as one statement (`bot.core.tagged_reads`):
        the keys already used (the job's id and its key: the full rows only when some are), the admission's (`FairQueue.admission_read`) and the quota book's
        (`Quotas.book_read`). Built once per combination of the parts, which are built once."""
        keys = tagged_reads.part(USED_KEYS, ints=[JOBS.c.id], texts=[JOBS.c.idempotency_key])
        keys = keys.where(one_of_param(JOBS.c.idempotency_key, "keys", postgres=self.db.is_postgres))
        return tagged_reads.merged([keys], queue_parts, quota_parts)

    @functools.cached_property
    def _jobs_of_keys(self) -> Any:
        """The jobs of `keys`, built once (see `bot.core.bulk.one_of_param`)."""
        return select(JOBS).where(one_of_param(JOBS.c.idempotency_key, "keys", postgres=self.db.is_postgres))

    @functools.cache  # noqa: B019 - as above
    def _upsert_users(self) -> Any:
        """Create the batch's users as needed and lock them, returning what the checks need."""
        pg = self.db.is_postgres
        values = from_rows((pg_insert if pg else sqlite_insert)(USERS), USERS, USER_ROW_COLUMNS, postgres=pg)
        upsert = values.on_conflict_do_update(
            index_elements=["platform", "platform_user_id"],
            set_={
                # An empty name (the adapter sent none) keeps the one we have.
                "display_name": case(
                    (values.excluded.display_name == "", USERS.c.display_name),
                    else_=values.excluded.display_name,
                ),
                "is_admin": values.excluded.is_admin,
            },
        ).returning(
            USERS.c.id,
            USERS.c.platform,
            USERS.c.platform_user_id,
            USERS.c.display_name,
            USERS.c.banned,
            USERS.c.ban_reason,
            USERS.c.bonus_credits,
        )
        return upsert

    @staticmethod
    def _ask(pending: PendingJob, users: dict[tuple[str, str], Any]) -> QuotaAsk:
        actor = pending.actor
        user = users[(actor.platform, actor.user_id)]
        return QuotaAsk(user.id, actor.platform, actor.user_id, pending.place.guild_id, tuple(actor.role_ids))

    async def _read_rules(self, s: AsyncSession, place: Place) -> PlaceRules | CoreError:
        """The place's rules, or the refusal (NotAllowedHere where image commands are not
        allowed) that every submission of the batch in that place gets."""
        try:
            return await self.place_settings.check(s, place)
        except CoreError as e:
            return e
