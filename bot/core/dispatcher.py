"""The dispatcher: claims queued jobs from the database and runs them on the inference backend.

- Claims are atomic. PostgreSQL: `SELECT ... FOR UPDATE SKIP LOCKED` on the chosen row, then a
  conditional `UPDATE ... WHERE state = 'queued'`; SQLite: the claim transaction is `BEGIN IMMEDIATE`.
  Several processes (Discord, Slack, playground, replicas) can share one database.
- A claim is a lease (`lease_owner`, `lease_until`), renewed while the job runs. A job whose holder
  died (lease expired) is taken over by any dispatcher; a finished job whose result was not delivered
  yet is delivered by whoever takes it over. `delivered_at` is set once: a job is delivered once.
- Fair order: a queued job's rank is (jobs of its user now running) + (its place among its user's
  queued jobs); lowest rank first, then oldest. One user's burst of 20 therefore interleaves with
  everybody else's jobs instead of starving them.
- The server hears the fair order too: a job's `priority` is the number of its user's older jobs
  still running, so a server that admits by priority (the continuous engine) lets a newcomer's first
  job join its running batch before a heavy user's fifth.
- Only jobs of platforms with a delivery registered in this process are claimed.
- A failed job is refunded (the service's `refund`) before the adapter hears about it.
- Each delivery attempt is counted in the job row before the adapter is called (`delivery_attempt`
  in its view), so an adapter that finds 2 or more knows a process may have died between posting
  the result and recording it, and looks for that post instead of posting again.
- A lost database connection does not cost a job: the steps that record finished work (a result,
  a failure, a delivery) are retried while the database is unavailable (up to `lease_s`), and on
  the first round trip after a failure the dispatcher re-asserts the claims it still works on and
  hands back at once the ones it no longer does, instead of leaving them to sit out their lease
  and run again.
- An image storage that cannot be written or read fails the job at once (refunded, with a message
  that names the storage); it is not retried through lease expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import io
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from PIL import Image
from sqlalchemy import and_, case, func, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.backends.base import (
    BackendError,
    BackendEvent,
    BackendRejected,
    GeneratedImage,
    GenerationParams,
    InferenceBackend,
    describe_wait,
)
from bot.core.api import DatabaseError, ImageInfo, JobView, ResultImage, StorageError
from bot.core.db import retry_unavailable
from bot.core.models import ImageRow, Job, User
from bot.core.service import CoreService
from bot.core.storage import content_key

log = logging.getLogger("bot.core.dispatcher")

# Queue positions are reported to adapters for the first jobs only: past this, "you are far back"
# is all a user can use, and each report is a database write and a chat message edit.
MAX_REPORTED_POSITION = 50
# Candidates read per claim attempt; others may be taking the first ones at the same moment.
CLAIM_CANDIDATES = 16
# New jobs learn their queue position within this delay; batching them keeps a burst of
# submissions from costing one queue scan each.
NEW_POSITION_INTERVAL_S = 0.25
# How often to look for claims held by dead processes on this host (see _expire_dead_local_owners).
DEAD_OWNER_CHECK_S = 30.0
# A claimed job as the dispatcher runs it: its view and (task, strength, image key, mask key).
Loaded = tuple[JobView, tuple[str, float | None, str | None, str | None]]
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
T = TypeVar("T")

STORAGE_WRITE_FAILED = (
    "Your images were made but could not be saved: the bot's image storage is full or not writable. "
    "Your quota was refunded; please tell an admin."
)
STORAGE_READ_FAILED = (
    "This job's input image could not be read from the bot's image storage. Your quota was refunded."
)
RESULT_UNREADABLE = "Your images were made but can no longer be read from the bot's image storage."


class Dispatcher:
    def __init__(self, service: CoreService, backend: InferenceBackend, *, owner: str | None = None):
        self.service = service
        self.backend = backend
        self.config = service.config.bot
        self.db = service.db
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._main: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_heartbeat = 0.0
        self._last_positions = 0.0
        self._last_dead_check = -DEAD_OWNER_CHECK_S
        self._last_new_positions = 0.0
        # Set when a database call failed: the next successful tick re-asserts our claims first.
        self._db_trouble = False
        service.add_waker(self._wake.set)

    # ------------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._main is None:
            self._stopping = False
            self._main = asyncio.create_task(self._run(), name=f"dispatcher {self.owner}")

    async def stop(self) -> None:
        """Stop claiming, cancel jobs in flight and hand them back to the queue at once (so another
        process or the next start picks them up without waiting for the lease to expire)."""
        self._stopping = True  # also ends the loop should a cancellation ever be lost
        if self._main is not None:
            self._wake.set()
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
            self._main = None
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        try:
            async with self.db.session() as s:
                await s.execute(
                    update(Job)
                    .where(Job.lease_owner == self.owner, Job.state == "running")
                    .values(state="queued", lease_owner=None, lease_until=None, attempts=Job.attempts - 1)
                )
                await s.execute(
                    update(Job)
                    .where(Job.lease_owner == self.owner, Job.delivered_at.is_(None))
                    .values(lease_until=self.service.clock())  # undelivered results: take over now
                )
        except Exception:
            log.exception("could not release claims of %s; they expire after the lease", self.owner)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    # ------------------------------------------------------------------------------------------
    # main loop
    # ------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        log.info("dispatcher %s started (concurrency %d)", self.owner, self.config.dispatch_concurrency)
        while not self._stopping:
            self._wake.clear()
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except DatabaseError as e:
                # The database may be briefly unreachable; keep going, the jobs are safe in it.
                self._db_trouble = True
                log.warning("dispatcher tick failed: %s; retrying", e.message)
                await asyncio.sleep(self.config.poll_interval_s)
            except Exception:
                self._db_trouble = True
                log.exception("dispatcher tick failed; retrying")
                await asyncio.sleep(self.config.poll_interval_s)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
            # arrives as the event fires, and stop() would then wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_interval_s):
                    await self._wake.wait()

    async def _tick(self) -> None:
        platforms = sorted(self.service.deliveries)
        now_mono = time.monotonic()
        if self._db_trouble:
            await self._reassert_claims()
            self._last_heartbeat = now_mono
        if self._tasks and now_mono - self._last_heartbeat >= self.config.lease_s / 3:
            await self._heartbeat()
            self._last_heartbeat = now_mono
        if not platforms:
            return
        if now_mono - self._last_dead_check >= DEAD_OWNER_CHECK_S:
            self._last_dead_check = now_mono
            await self._expire_dead_local_owners()
        # Taken-over work first: it has waited longest.
        while self._free() and (job_id := await self._claim_stale(platforms)) is not None:
            self._spawn(job_id)
        while self._free():
            claimed = await self._claim_queued(platforms, self.config.dispatch_concurrency - len(self._tasks))
            for job_id, loaded in claimed:
                self._spawn(job_id, loaded)
            if not claimed:
                break
        # Positions of newly queued jobs go out at once; changes of known ones at most every
        # progress_interval_s (each one is a chat message edit, and the queue moves constantly).
        if now_mono - self._last_positions >= self.config.progress_interval_s:
            self._last_positions = self._last_new_positions = now_mono
            await self._report_positions(platforms, only_new=False)
        elif now_mono - self._last_new_positions >= NEW_POSITION_INTERVAL_S:
            self._last_new_positions = now_mono
            await self._report_positions(platforms, only_new=True)

    def _free(self) -> bool:
        return len(self._tasks) < self.config.dispatch_concurrency

    def _spawn(self, job_id: int, loaded: Loaded | None = None) -> None:
        task = asyncio.create_task(self._execute(job_id, loaded), name=f"job {job_id}")
        self._tasks[job_id] = task

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.pop(job_id, None)
            self._wake.set()

        task.add_done_callback(done)

    # ------------------------------------------------------------------------------------------
    # claiming
    # ------------------------------------------------------------------------------------------

    def _lease_until(self) -> dt.datetime:
        return self.service.clock() + dt.timedelta(seconds=self.config.lease_s)

    async def fair_order(self, s: AsyncSession, platforms: Sequence[str] | None, limit: int) -> list[int]:
        """Ids of queued jobs in dispatch order (see module docstring), at most `limit`."""
        now = self.service.clock()
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

    async def _claim_queued(self, platforms: Sequence[str], want: int) -> list[tuple[int, Loaded]]:
        """Claim up to `want` jobs in fair order, in one transaction; return them loaded."""
        claimed: list[int] = []
        async with self.db.session() as s:
            candidates = await self.fair_order(s, platforms, max(CLAIM_CANDIDATES, want))
            for job_id in candidates:
                if len(claimed) >= want:
                    break
                if self.db.is_postgres:
                    locked = (
                        await s.execute(
                            select(Job.id)
                            .where(Job.id == job_id, Job.state == "queued")
                            .with_for_update(skip_locked=True)
                        )
                    ).scalar_one_or_none()
                    if locked is None:
                        continue  # another dispatcher is taking it right now
                now = self.service.clock()
                result = await s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == "queued")
                    .values(
                        state="running",
                        lease_owner=self.owner,
                        lease_until=self._lease_until(),
                        started_at=func.coalesce(Job.started_at, now),
                        attempts=Job.attempts + 1,
                        notified_position=None,
                    )
                )
                if result.rowcount == 1:
                    await s.execute(
                        update(User)
                        .where(User.id == select(Job.user_id).where(Job.id == job_id).scalar_subquery())
                        .values(last_dispatched_at=now)
                    )
                    claimed.append(job_id)
            if not claimed:
                return []
            rows = (
                await s.execute(
                    select(Job, User)
                    .join(User, Job.user_id == User.id)
                    .where(Job.id.in_(claimed))
                    .execution_options(populate_existing=True)
                )
            ).all()
            loaded = {job.id: await self._load(s, job, user) for job, user in rows}
        return [(job_id, loaded[job_id]) for job_id in claimed]

    async def _load(self, s: AsyncSession, job: Job, user: User | None = None) -> Loaded:
        # Only a finished job has images; skip the query for the usual (queued/running) case.
        view = await self.service._view(s, job, user, images=None if job.state == "succeeded" else ())
        return view, (
            job.params.get("task", "txt2img"),
            job.params.get("strength"),
            job.input_image_key,
            job.mask_key,
        )

    async def _claim_stale(self, platforms: Sequence[str]) -> int | None:
        """Take over a running job, or an undelivered finished one, whose lease has expired."""
        now = self.service.clock()
        stale = and_(
            Job.platform.in_(platforms),
            Job.lease_until < now,
            # Not a job this process is still working on (its lease may have lapsed in a stall).
            Job.id.not_in(list(self._tasks)) if self._tasks else true(),
            or_(
                Job.state == "running",
                and_(Job.state.in_(("succeeded", "failed")), Job.delivered_at.is_(None)),
            ),
        )
        async with self.db.session() as s:
            q = select(Job.id, Job.lease_owner).where(stale).order_by(Job.id).limit(1)
            if self.db.is_postgres:
                q = q.with_for_update(skip_locked=True)
            row = (await s.execute(q)).first()
            if row is None:
                return None
            job_id, previous = row
            result = await s.execute(
                update(Job)
                .where(Job.id == job_id, stale)
                .values(
                    lease_owner=self.owner,
                    lease_until=self._lease_until(),
                    attempts=Job.attempts + case((Job.state == "running", 1), else_=0),
                )
            )
            if result.rowcount != 1:
                return None
        log.warning("job %s: taking over from %s (lease expired)", job_id, previous)
        return job_id

    async def _expire_dead_local_owners(self) -> None:
        """Expire at once the leases of dispatchers that ran on this host and whose process is gone
        (a bot restarted after a crash resumes its jobs now instead of after `lease_s`). Owners on
        other hosts, or whose pid is alive (maybe reused), keep their lease until it expires."""
        host = socket.gethostname()
        async with self.db.read() as s:
            owners = (
                await s.execute(
                    select(Job.lease_owner)
                    .where(
                        Job.lease_owner.is_not(None), Job.lease_owner.startswith(f"{host}:", autoescape=True)
                    )
                    .distinct()
                )
            ).scalars()
            dead = [owner for owner in owners if owner != self.owner and not _pid_alive(owner)]
        if not dead:
            return
        async with self.db.session() as s:
            await s.execute(
                update(Job)
                .where(Job.lease_owner.in_(dead), Job.lease_until > self.service.clock())
                .values(lease_until=self.service.clock())
            )
        log.warning("claims of dead local process(es) %s expire now", ", ".join(dead))

    async def _reassert_claims(self) -> None:
        """After a database failure: renew the leases of the jobs this dispatcher still works on,
        and hand back at once the ones it holds but no longer works on (a task that ended on the
        error, a claim whose commit went through though its answer was lost), so that nobody waits
        out a lease and no job runs twice."""
        ids = list(self._tasks)
        mine = [Job.lease_owner == self.owner]
        if ids:
            mine.append(Job.id.not_in(ids))
        async with self.db.session() as s:
            if ids:
                await s.execute(
                    update(Job)
                    .where(Job.id.in_(ids), Job.lease_owner == self.owner)
                    .values(lease_until=self._lease_until())
                )
            released = await s.execute(
                update(Job)
                .where(*mine, Job.state == "running")
                .values(state="queued", lease_owner=None, lease_until=None)
            )
            undelivered = await s.execute(
                update(Job)
                .where(*mine, Job.state.in_(("succeeded", "failed")), Job.delivered_at.is_(None))
                .values(lease_until=self.service.clock())
            )
        self._db_trouble = False
        if released.rowcount or undelivered.rowcount:
            log.warning(
                "after a database failure: %d claimed job(s) handed back to the queue, %d result(s) "
                "to deliver now",
                released.rowcount,
                undelivered.rowcount,
            )
        self._wake.set()

    async def _recorded(self, job_id: int, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """A database step of a job we hold, retried while the database is unavailable."""
        try:
            return await retry_unavailable(op, within_s=self.config.lease_s, what=f"job {job_id}: {what}")
        except DatabaseError:
            self._db_trouble = True
            raise

    async def _heartbeat(self) -> None:
        ids = list(self._tasks)
        if not ids:
            return
        async with self.db.session() as s:
            await s.execute(
                update(Job)
                .where(Job.id.in_(ids), Job.lease_owner == self.owner)
                .values(lease_until=self._lease_until())
            )
            still = set(
                (
                    await s.execute(select(Job.id).where(Job.id.in_(ids), Job.lease_owner == self.owner))
                ).scalars()
            )
        for job_id in ids:
            if job_id not in still and job_id in self._tasks:
                # Our lease lapsed (a long stall) and another dispatcher took the job: stop ours.
                log.warning("job %s: lease lost to another dispatcher; abandoning our run", job_id)
                self._tasks[job_id].cancel()

    async def _report_positions(self, platforms: Sequence[str], *, only_new: bool) -> None:
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
                return
        async with self.db.session() as s:
            order = await self.fair_order(s, None, MAX_REPORTED_POSITION)
            if not order:
                return
            current = dict(
                (await s.execute(select(Job.id, Job.notified_position).where(Job.id.in_(order))))
                .tuples()
                .all()
            )
            changed: list[tuple[int, int]] = []
            for position, job_id in enumerate(order, start=1):
                known = current.get(job_id)
                if known == position or (only_new and known is not None):
                    continue
                # Conditional: of several processes reporting, one wins each change.
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
                if result.rowcount == 1:
                    changed.append((job_id, position))
        if not changed:
            return
        views = await self.service.job_views([job_id for job_id, _ in changed])
        for job_id, position in changed:
            view = views.get(job_id)
            if view is not None and view.state == "queued":
                await self._call(view, "on_queued", view, position)

    # ------------------------------------------------------------------------------------------
    # running one job
    # ------------------------------------------------------------------------------------------

    async def _call(self, view: JobView, method: str, *args: object) -> bool:
        delivery = self.service.deliveries.get(view.platform)
        if delivery is None:
            log.warning("job %s: no delivery for %s; %s not sent", view.id, view.platform, method)
            return False
        try:
            await getattr(delivery, method)(*args)
            return True
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: delivery %s.%s failed", view.id, view.platform, method)
            return False

    async def _execute(self, job_id: int, loaded: Loaded | None = None) -> None:
        try:
            if loaded is None:

                async def load() -> Loaded:
                    async with self.db.read() as s:
                        job = await s.get(Job, job_id)
                        assert job is not None
                        return await self._load(s, job)

                loaded = await self._recorded(job_id, "load", load)
            view, inputs = loaded
            if view.state in ("succeeded", "failed"):
                await self._deliver(view)  # taken over after the result was stored
                return
            await self._run_job(view, *inputs)
        except asyncio.CancelledError:
            raise
        except DatabaseError as e:
            # Handed back on the next successful round trip (see _reassert_claims).
            self._db_trouble = True
            log.warning("job %s: %s; it is handed back once the database answers", job_id, e.message)
        except Exception:
            self._db_trouble = True
            log.exception("job %s: dispatcher error; it is handed back to the queue", job_id)

    async def _priority(self, view: JobView) -> int:
        """The fair order carried to the server: this user's older jobs still running.

        A server with the continuous engine admits lower values first, so the second job of a user's
        burst waits behind other users' first jobs there too, not only in our queue.
        """
        owner = select(Job.user_id).where(Job.id == view.id).scalar_subquery()

        async def read() -> int:
            async with self.db.read() as s:
                ahead = await s.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.user_id == owner, Job.state == "running", Job.id < view.id)
                )
            return int(ahead or 0)

        return await self._recorded(view.id, "priority", read)

    async def _run_job(
        self, view: JobView, task: str, strength: float | None, image_key: str | None, mask_key: str | None
    ) -> None:
        if view.attempts > self.config.max_attempts:
            await self._fail(view, "This job failed repeatedly and was stopped; your quota was refunded.")
            return
        try:
            image = await self.service.storage.get(image_key) if image_key else None
            mask = await self.service.storage.get(mask_key) if mask_key else None
        except (KeyError, StorageError) as e:
            log.error("job %s: input image unavailable: %r", view.id, e)
            await self._fail(view, STORAGE_READ_FAILED)
            return
        p = view.params
        params = GenerationParams(
            task=task,
            prompt=view.prompt,
            negative_prompt=view.negative_prompt,
            seeds=p.seeds,
            width=p.width,
            height=p.height,
            steps=p.steps,
            guidance=p.guidance,
            strength=strength if strength is not None else 0.6,
            image=image,
            mask=mask,
            priority=await self._priority(view),
            timeout_s=self.config.job_timeout_s,
        )
        await self._call(view, "on_progress", view, 0, p.steps)
        last_progress = time.monotonic()

        async def on_event(event: BackendEvent) -> None:
            nonlocal last_progress
            if event.kind != "progress" or event.step is None or event.total is None:
                return
            now = time.monotonic()
            final = event.step >= event.total
            # Throttled: chat platforms rate-limit message edits; the final step always goes out.
            if final or now - last_progress >= self.config.progress_interval_s:
                last_progress = now
                await self._call(view, "on_progress", view, event.step, event.total)

        log.info("job %s: running on %s (attempt %d)", view.id, self.backend.name, view.attempts)
        try:
            async with asyncio.timeout(self.config.job_timeout_s):
                images = await self.backend.generate(params, on_event)
        except BackendError as e:
            if e.retryable and view.attempts < self.config.max_attempts:
                await self._requeue(view, e)
                return
            if isinstance(e, BackendRejected):
                message = f"The image backend refused this job: {e.message}. Your quota was refunded."
            elif e.retry_after_s is not None:
                message = (
                    "The image server is busy right now; your quota was refunded. "
                    f"Please try again in about {describe_wait(e.retry_after_s)}."
                )
            else:
                message = "The image server is unavailable right now; your quota was refunded. Please try again later."
            log.warning("job %s failed: %s: %s", view.id, type(e).__name__, e.message)
            await self._fail(view, message)
            return
        except TimeoutError:
            log.warning("job %s timed out after %.0f s", view.id, self.config.job_timeout_s)
            await self._fail(view, "This job took too long and was stopped; your quota was refunded.")
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: backend %s raised unexpectedly", view.id, self.backend.name)
            await self._fail(view, "Something went wrong while generating; your quota was refunded.")
            return
        await self._succeed(view, images)

    async def _requeue(self, view: JobView, error: BackendError) -> None:
        # A backend told how long to wait (a rate limit's Retry-After): retrying sooner would only
        # spend the attempt on the same refusal.
        delay = max(self.config.retry_backoff_s * view.attempts, error.retry_after_s or 0.0)
        log.warning("job %s: %s; retrying in %.0f s (attempt %d of %d)", view.id, error.message, delay,
                    view.attempts, self.config.max_attempts)  # fmt: skip

        async def write() -> None:
            async with self.db.session() as s:
                await s.execute(
                    update(Job)
                    .where(Job.id == view.id, Job.lease_owner == self.owner, Job.state == "running")
                    .values(
                        state="queued",
                        lease_owner=None,
                        lease_until=None,
                        not_before=self.service.clock() + dt.timedelta(seconds=delay),
                    )
                )

        await self._recorded(view.id, "requeue", write)

    async def _succeed(self, view: JobView, images: list[GeneratedImage]) -> None:
        if len(images) != view.params.n:
            log.error("job %s: backend returned %d images for n=%d", view.id, len(images), view.params.n)
            await self._fail(view, "The image server returned an incomplete result; your quota was refunded.")
            return
        stored: list[ResultImage] = []
        try:
            for index, image in enumerate(images):
                key = await self.service.storage.put(image.png)
                width, height = _image_size(image.png) or (view.params.width, view.params.height)
                info = ImageInfo(
                    index, int(image.seed), key, content_key(image.png), len(image.png), width, height
                )
                stored.append(ResultImage(info, image.png))
        except StorageError:
            # Logged by the storage with the path and the cause; retrying would fail the same way.
            await self._fail(view, STORAGE_WRITE_FAILED)
            return
        now = self.service.clock()

        async def write() -> bool:
            async with self.db.session() as s:
                result = await s.execute(
                    update(Job)
                    .where(Job.id == view.id, Job.lease_owner == self.owner, Job.state == "running")
                    .values(state="succeeded", finished_at=now, error=None, lease_until=self._lease_until())
                )
                if result.rowcount != 1:
                    return False
                for r in stored:
                    i = r.info
                    s.add(
                        ImageRow(
                            job_id=view.id,
                            index=i.index,
                            seed=i.seed,
                            storage_key=i.storage_key,
                            sha256=i.sha256,
                            size_bytes=i.size_bytes,
                            width=i.width,
                            height=i.height,
                            created_at=now,
                        )
                    )
            return True

        if not await self._recorded(view.id, "store the result", write):
            log.warning("job %s: finished but no longer ours; discarding this result", view.id)
            return
        log.info("job %s succeeded: %d image(s)", view.id, len(stored))
        done = dataclasses.replace(
            view, state="succeeded", finished_at=now, images=tuple(r.info for r in stored), error=None
        )
        await self._deliver(done, stored)

    async def _fail(self, view: JobView, message: str) -> None:
        async def write() -> bool:
            async with self.db.session() as s:
                job = (
                    await s.execute(
                        select(Job).where(Job.id == view.id).execution_options(populate_existing=True)
                    )
                ).scalar_one()
                if job.lease_owner != self.owner or job.state not in ("running", "queued"):
                    return False
                owner = await s.get(User, job.user_id)
                assert owner is not None
                owner = await self.service._lock_user(s, owner.platform, owner.platform_user_id, None)
                job.state = "failed"
                job.error = message
                job.finished_at = self.service.clock()
                job.lease_until = self._lease_until()
                await self.service.refund(s, job, owner)
            return True

        if not await self._recorded(view.id, "record the failure", write):
            return
        view = await self._recorded(view.id, "read", lambda: self.service.job_view(view.id))
        await self._deliver(view)

    async def _deliver(self, view: JobView, images: list[ResultImage] | None = None) -> None:
        """Count the attempt, call on_succeeded / on_failed, then mark the job delivered (each step
        only while we still hold the job)."""

        async def count_attempt() -> int | None:
            async with self.db.session() as s:
                result = await s.execute(
                    update(Job)
                    .where(Job.id == view.id, Job.lease_owner == self.owner, Job.delivered_at.is_(None))
                    .values(delivery_attempts=Job.delivery_attempts + 1)
                    .returning(Job.delivery_attempts)
                )
                return result.scalar_one_or_none()

        attempt = await self._recorded(view.id, "count the delivery attempt", count_attempt)
        if attempt is None:
            log.info("job %s: delivered already or no longer ours; not delivering again", view.id)
            return
        view = dataclasses.replace(view, delivery_attempt=attempt)
        if attempt > 1:
            log.warning("job %s: delivery attempt %d (an earlier one did not finish)", view.id, attempt)
        if view.state == "succeeded":
            if images is None:
                try:
                    images = [
                        ResultImage(i, await self.service.storage.get(i.storage_key)) for i in view.images
                    ]
                except (KeyError, StorageError) as e:
                    log.error("job %s: result images unreadable: %r", view.id, e)
                    images = None
            if images is not None:
                ok = await self._call(view, "on_succeeded", view, images)
            else:
                ok = await self._call(view, "on_failed", view, RESULT_UNREADABLE)
        else:
            ok = await self._call(view, "on_failed", view, view.error or "The job failed.")

        async def mark() -> None:
            async with self.db.session() as s:
                await s.execute(
                    update(Job)
                    # delivered_at may already be set by attach_result_message (the adapter posted
                    # the result); the lease check alone makes this the one holder's update.
                    .where(Job.id == view.id, Job.lease_owner == self.owner)
                    .values(
                        delivered_at=func.coalesce(Job.delivered_at, self.service.clock()),
                        delivery_error=None if ok else "delivery callback failed (see log)",
                        lease_owner=None,
                        lease_until=None,
                    )
                )

        await self._recorded(view.id, "mark delivered", mark)
        self.service.job_changed(view.id)


def _pid_alive(owner: str) -> bool:
    """For an owner id "host:pid:nonce" on this host: is that pid a running process?"""
    try:
        pid = int(owner.split(":")[1])
    except (IndexError, ValueError):
        return True  # not ours to judge: wait for the lease
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _image_size(png: bytes) -> tuple[int, int] | None:
    """The real size of a returned image (a hosted API may not honour the requested size);
    reads the header only."""
    try:
        with Image.open(io.BytesIO(png)) as img:
            return img.size
    except (OSError, ValueError):
        return None
