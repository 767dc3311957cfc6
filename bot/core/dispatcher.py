"""The dispatcher: runs claimed jobs on the inference backend and delivers their outcome.

It decides when and what; the database side of each step is the service's (`CoreService.claims`,
`.results`, `.queue`):

- Claims are atomic leases, renewed while a job runs (see `bot.core.claims`). A job whose holder
  died is taken over by any dispatcher; a finished job whose result was not delivered yet is
  delivered by whoever takes it over. `delivered_at` is set once: a job is delivered once.
- Fair order (see `bot.core.fair_queue`): each user's first job runs before anybody's second. The
  server hears the fair order too: a job's `priority` is the number of its user's older jobs still
  running, so a server that admits by priority (the continuous engine) lets a newcomer's first job
  join its running batch before a heavy user's fifth.
- Only jobs of platforms with a delivery registered in this process are claimed, as many per
  round trip as there are free slots.
- It wakes when this process queues a job, on PostgreSQL when any process does (LISTEN/NOTIFY, see
  `bot.core.wakeup`), and every `poll_interval_s` in any case. Leases are renewed by a task of
  their own, never behind a slow tick.
- A failed job is refunded before the adapter hears about it.
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
import io
import logging
import os
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from PIL import Image

from bot.backends.base import (
    BackendError,
    BackendEvent,
    BackendOutage,
    BackendRejected,
    GeneratedImage,
    GenerationParams,
    InferenceBackend,
    describe_wait,
)
from bot.core import tiling
from bot.core.api import DatabaseError, ImageInfo, JobView, PreviewDelivery, ResultImage, StorageError
from bot.core.claims import ClaimedJob
from bot.core.concurrency import dispatch_concurrency
from bot.core.db import retry_unavailable
from bot.core.heartbeats import Heartbeats
from bot.core.service import CoreService
from bot.core.submit_activity import STORM, STORM_HOLD_S, SUBMISSIONS_FIRST_S
from bot.core.wakeup import JobListener

log = logging.getLogger("bot.core.dispatcher")

# New jobs learn their queue position within this delay; batching them keeps a burst of
# submissions from costing one queue scan each.
NEW_POSITION_INTERVAL_S = 0.25
T = TypeVar("T")

STORAGE_WRITE_FAILED = (
    "Your images were made but could not be saved: the bot's image storage is full or not writable. "
    "Your quota was refunded; please tell an admin."
)
STORAGE_READ_FAILED = (
    "This job's input image could not be read from the bot's image storage. Your quota was refunded."
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESULT_UNREADABLE = "Your images were made but can no longer be read from the bot's image storage."


class Dispatcher:
    def __init__(self, service: CoreService, backend: InferenceBackend, *, owner: str | None = None):
        self.service = service
        self.backend = backend
        self.config = service.config.bot
        self.claims = service.claims
        self.results = service.results
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        # Jobs whose task only delivers an outcome now: they hold no dispatch slot, so a slow or
        # retried post (a platform outage) never holds back generation.
        self._delivering: set[int] = set()
        self._previews: dict[str, tuple[object, bool]] = {}  # see _takes_previews
        self._main: asyncio.Task[None] | None = None
        self._first_round = asyncio.Event()
        self._stopping = False
        # Jobs whose images are made (or whose failure is decided): storing, recording or delivering
        # the outcome. A stop gives these `[bot] shutdown_grace_s` to finish instead of cancelling them.
        self._finishing: set[int] = set()
        self._stopped = False
        self._last_positions = 0.0
        # Liveness: this dispatcher's heartbeat, and the takeover of dead ones' claims.
        self.heartbeats = Heartbeats(
            service.db,
            service.clock,
            owner=self.owner,
            lease_s=self.config.lease_s,
            poll_interval_s=self.config.poll_interval_s,
        )
        self._last_dead_check = -self.heartbeats.interval_s
        # Dispatchers sharing the servers' capacity (this one and the busy live ones), counted at
        # each beat.
        self._dispatchers = 1
        self._last_new_positions = 0.0
        # Set when a tick came too soon after the last look for new jobs' positions: the loop then
        # ticks again when the interval ends, so a job queued then learns its place within
        # NEW_POSITION_INTERVAL_S rather than at the next poll (or whenever something else wakes us).
        self._positions_due_at: float | None = None
        self._last_takeover = -float("inf")
        # Until then another process's storm of submissions goes first (bot.core.submit_activity).
        self._storm_until = 0.0
        # Set when a database call failed: the next successful tick re-asserts our claims first.
        self._db_trouble = False
        self._leases: asyncio.Task[None] | None = None
        # PostgreSQL: woken by other processes' submissions too (LISTEN/NOTIFY); the poll remains.
        self._listener = (
            JobListener(service.db.engine.url, self._notified)
            if service.db.is_postgres and service.config.database.notify
            else None
        )
        service.add_waker(self._wake.set)
        service.add_cancel_listener(self._abandon)

    # ------------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._main is None:
            self._stopping = self._stopped = False
            self._main = asyncio.create_task(self._run(), name=f"dispatcher {self.owner}")
            self._leases = asyncio.create_task(self._keep_leases(), name=f"leases {self.owner}")

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming; cancel the jobs still generating; give those whose outcome is being
        stored, recorded or delivered up to `grace_s` (default `[bot] shutdown_grace_s`) to finish,
        then cancel them too (the next start delivers what is left, once); hand every job still
        ours back to the queue at once (so another process or the next start picks it up without
        waiting for the lease to expire).

        Call it before the chat adapters close (`bot.__main__`): a delivery still running when its
        adapter closes is cut off and left for the next start. A second call does nothing."""
        if self._stopped and self._main is None:
            return
        self._stopping = True  # also ends the loop should a cancellation ever be lost
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        if self._main is not None:
            self._wake.set()
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
            self._main = None
        tasks = dict(self._tasks)
        for job_id, task in tasks.items():
            if job_id not in self._finishing:
                task.cancel()
        finishing = [task for job_id, task in tasks.items() if job_id in self._finishing]
        if finishing:
            log.info("waiting up to %.0f s for %d job(s) being delivered", grace_s, len(finishing))
            _, late = await asyncio.wait(finishing, timeout=grace_s)
            if late:
                log.warning("%d delivery(ies) cut off by the stop; the next start delivers them", len(late))
            for task in late:
                task.cancel()
        for task in tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._leases is not None:  # renewed until here: a delivery in its grace keeps its job
            self._leases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._leases
            self._leases = None
        if self._listener is not None:
            await self._listener.close()
        try:
            await self.claims.release_all(self.owner)
            await self.heartbeats.forget()
        except Exception:
            log.exception("could not release claims of %s; they expire after the lease", self.owner)
        self._stopped = True

    @property
    def listening(self) -> bool:
        """Woken by other processes' submissions (PostgreSQL LISTEN), not only by the poll."""
        return self._listener is not None and self._listener.listening

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    # ------------------------------------------------------------------------------------------
    # main loop
    # ------------------------------------------------------------------------------------------

    async def first_round(self, within_s: float = 30.0) -> None:
        """Wait (at most `within_s`) until the dispatcher's first round has run, successful or not.
        Its first statements (heartbeat, takeover, claim) compile then: run while the first users
        submit, they took tens of milliseconds from those users' submissions."""
        if self._main is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self._first_round.wait()

    async def _run(self) -> None:
        log.info("dispatcher %s started (concurrency %d)", self.owner, self._concurrency())
        while not self._stopping:
            self._wake.clear()
            try:
                if self._listener is not None:
                    await self._listener.ensure()
                try:
                    await self._tick()
                finally:
                    self._first_round.set()
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
            wait_s = self.config.poll_interval_s
            if self._positions_due_at is not None:
                wait_s = min(wait_s, max(0.0, self._positions_due_at - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()

    async def _tick(self) -> None:
        # Submissions go first (bot.core.submit_activity): a round that would take turns with a
        # burst of them waits until it pauses, for SUBMISSIONS_FIRST_S at most.
        defer_until = time.monotonic() + SUBMISSIONS_FIRST_S
        await self._submissions_first(defer_until)
        platforms = sorted(self.service.deliveries)
        now_mono = time.monotonic()
        if self._db_trouble:
            await self._reassert_claims()
        if now_mono - self._last_dead_check >= self.heartbeats.interval_s:
            self._last_dead_check = now_mono
            await self.heartbeats.beat()
            dead = await self.heartbeats.expire_dead_owners()
            if dead:
                log.warning("claims of dispatcher(s) %s expire now (no heartbeat)", ", ".join(dead))
            dispatchers = await self.heartbeats.sharing_dispatchers()
            if dispatchers != self._dispatchers:
                self._dispatchers = dispatchers
                log.debug(
                    "dispatcher %s: %d busy dispatcher(s) share the servers; concurrency %d",
                    self.owner, dispatchers, self._concurrency(),
                )  # fmt: skip
        if not platforms:
            return
        # Taken-over work first: it has waited longest. Looked for once per poll interval, not on
        # every tick: a tick follows every finished job, and a lease expires in tens of seconds.
        while self._free() and now_mono - self._last_takeover >= self.config.poll_interval_s:
            taken = await self.claims.take_over_expired(self.owner, platforms, self._tasks)
            if taken is None:
                self._last_takeover = now_mono
                break
            job_id, previous = taken
            log.warning("job %s: taking over from %s (lease expired)", job_id, previous)
            self._spawn(job_id)
        while self._free():
            await self._submissions_first(defer_until)  # again: the steps above took a while
            want = self._concurrency() - (len(self._tasks) - len(self._delivering))
            claimed = await self.claims.claim_queued(self.owner, platforms, want)
            for job in claimed:
                self._spawn(job.view.id, job)
            if not claimed:
                break
        # Positions of newly queued jobs go out at once; changes of known ones at most every
        # progress_interval_s (each one is a chat message edit, and the queue moves constantly).
        self._positions_due_at = None
        await self._submissions_first(defer_until)
        if now_mono - self._last_positions >= self.config.progress_interval_s:
            self._last_positions = self._last_new_positions = now_mono
            await self._report_positions(platforms, only_new=False)
        elif now_mono - self._last_new_positions >= NEW_POSITION_INTERVAL_S:
            self._last_new_positions = now_mono
            await self._report_positions(platforms, only_new=True)
        else:
            self._positions_due_at = self._last_new_positions + NEW_POSITION_INTERVAL_S

    def _notified(self, payload: str) -> None:
        if payload == STORM:
            self._storm_until = time.monotonic() + STORM_HOLD_S
        self._wake.set()

    async def _submissions_first(self, until: float) -> None:
        """Wait while this process takes submissions, or another one announced a storm of them,
        until `until` at the latest."""
        while (now := time.monotonic()) < until:
            if self.service.activity.busy:
                await self.service.activity.quiet(until - now)
            elif self._storm_until > now:
                await asyncio.sleep(min(self._storm_until, until) - now)
            else:
                return

    def _free(self) -> bool:
        return len(self._tasks) - len(self._delivering) < self._concurrency()

    def _concurrency(self) -> int:
        return dispatch_concurrency(self.config, self.backend.capacity(), self._dispatchers)

    @property
    def concurrency(self) -> int:
        """Jobs this dispatcher sends to the backend at once now (its share of the servers)."""
        return self._concurrency()

    def _abandon(self, job_id: int) -> None:
        """The job was cancelled while it ran (its claim is gone): stop our run of it."""
        task = self._tasks.get(job_id)
        if task is not None and job_id not in self._delivering:
            log.info("job %s: cancelled while running; stopping it", job_id)
            task.cancel()

    def _spawn(self, job_id: int, claimed: ClaimedJob | None = None) -> None:
        task = asyncio.create_task(self._execute(job_id, claimed), name=f"job {job_id}")
        self._tasks[job_id] = task

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.pop(job_id, None)
            self._finishing.discard(job_id)
            self._wake.set()

        task.add_done_callback(done)

    # ------------------------------------------------------------------------------------------
    # keeping claims
    # ------------------------------------------------------------------------------------------

    async def _reassert_claims(self) -> None:
        """After a database failure: keep the claims we still work on, hand back the others."""
        handed_back = await self.claims.reassert(self.owner, self._tasks)
        self._db_trouble = False
        if handed_back.requeued or handed_back.to_deliver:
            log.warning(
                "after a database failure: %d claimed job(s) handed back to the queue, %d result(s) "
                "to deliver now",
                handed_back.requeued,
                handed_back.to_deliver,
            )
        self._wake.set()

    async def _recorded(self, job_id: int, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """A database step of a job we hold, retried while the database is unavailable."""
        try:
            return await retry_unavailable(op, within_s=self.config.lease_s, what=f"job {job_id}: {what}")
        except DatabaseError:
            self._db_trouble = True
            raise

    async def _keep_leases(self) -> None:
        """Renew our leases every third of `lease_s`, in a task of its own: a tick that waits (a
        busy database, a slow chat call reporting positions) must not let a running job's lease
        lapse and another dispatcher take it over."""
        while True:
            await asyncio.sleep(self.config.lease_s / 3)
            if not self._tasks or self._db_trouble:
                continue  # after a failure the tick re-asserts the claims (and renews them)
            try:
                await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except DatabaseError as e:
                self._db_trouble = True
                log.warning("renewing leases failed: %s; re-asserting them next tick", e.message)
                self._wake.set()
            except Exception:
                self._db_trouble = True
                log.exception("renewing leases failed; re-asserting them next tick")
                self._wake.set()

    async def _heartbeat(self) -> None:
        ids = list(self._tasks)
        if not ids:
            return
        still = await self.claims.renew(self.owner, ids)
        for job_id in ids:
            if job_id not in still and job_id in self._tasks:
                # Our lease lapsed (a long stall) and another dispatcher took the job: stop ours.
                log.warning("job %s: lease lost to another dispatcher; abandoning our run", job_id)
                self._tasks[job_id].cancel()

    async def _report_positions(self, platforms: list[str], *, only_new: bool) -> None:
        changed = await self.service.queue.positions_to_report(platforms, only_new=only_new)
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

    async def _execute(self, job_id: int, claimed: ClaimedJob | None = None) -> None:
        try:
            if claimed is None:
                claimed = await self._recorded(job_id, "load", lambda: self.claims.load(job_id))
            if claimed.view.state in ("succeeded", "failed"):
                await self._deliver(claimed.view)  # taken over after the result was stored
                return
            await self._run_job(claimed)
        except asyncio.CancelledError:
            raise
        except DatabaseError as e:
            # Handed back on the next successful round trip (see _reassert_claims).
            self._db_trouble = True
            log.warning("job %s: %s; it is handed back once the database answers", job_id, e.message)
        except Exception:
            self._db_trouble = True
            log.exception("job %s: dispatcher error; it is handed back to the queue", job_id)

    async def _run_job(self, job: ClaimedJob) -> None:
        view = job.view
        if view.attempts > self.config.max_attempts:
            await self._fail(view, "This job failed repeatedly and was stopped; your quota was refunded.")
            return
        try:
            image = await self.service.storage.get(job.image_key) if job.image_key else None
            mask = await self.service.storage.get(job.mask_key) if job.mask_key else None
        except (KeyError, StorageError) as e:
            log.error("job %s: input image unavailable: %r", view.id, e)
            await self._fail(view, STORAGE_READ_FAILED)
            return
        p = view.params
        params = GenerationParams(
            task=job.task,
            prompt=view.prompt,
            negative_prompt=view.negative_prompt,
            seeds=p.seeds,
            width=p.width,
            height=p.height,
            steps=p.steps,
            guidance=p.guidance,
            strength=job.strength if job.strength is not None else 0.6,
            image=image,
            mask=mask,
            priority=(
                job.priority
                if job.priority is not None
                else await self._recorded(view.id, "priority", lambda: self.claims.priority(view.id))
            ),
            timeout_s=self.config.job_timeout_s,
            model=p.model,
            loras=p.loras,
        )
        await self._call(view, "on_progress", view, 0, p.steps)
        last_progress = time.monotonic()
        last_preview: float | None = None
        previews = self.config.preview_interval_s > 0 and self._takes_previews(view.platform)

        job_timeout = asyncio.timeout(self.config.job_timeout_s)

        async def on_event(event: BackendEvent) -> None:
            nonlocal last_progress, last_preview
            if event.kind == "waiting":
                # No server is reachable: the backend waits one out (up to its outage horizon), and
                # the wait is not the job's run time.
                job_timeout.reschedule(asyncio.get_running_loop().time() + self.config.job_timeout_s)
                await self._call(view, "on_waiting", view, waiting_message(event))
                return
            if event.step is None or event.total is None:
                return
            if event.kind == "preview":
                # The first image's only (one picture per status message), throttled like progress:
                # each one is a message edit with an upload.
                now = time.monotonic()
                if not previews or event.extra.get("index") != 0:
                    return
                if last_preview is not None and now - last_preview < self.config.preview_interval_s:
                    return
                last_preview = now
                await self._call(view, "on_preview", view, event.step, event.total, event.extra["png"])
                return
            if event.kind != "progress":
                return
            now = time.monotonic()
            final = event.step >= event.total
            # Throttled: chat platforms rate-limit message edits; the final step always goes out.
            if final or now - last_progress >= self.config.progress_interval_s:
                last_progress = now
                await self._call(view, "on_progress", view, event.step, event.total)

        log.info("job %s: running on %s (attempt %d)", view.id, self.backend.name, view.attempts)
        try:
            async with job_timeout:
                limits = self.service.limits(p.model)
                images = await tiling.generate(
                    self.backend,
                    params,
                    on_event,
                    max_side=min(self.config.max_side, limits.max_side),
                    multiple=limits.size_multiple,
                )
        except BackendError as e:
            if e.retryable and view.attempts < self.config.max_attempts:
                await self._requeue(view, e)
                return
            if isinstance(e, BackendRejected):
                message = f"The image backend refused this job: {e.message}. Your quota was refunded."
            elif isinstance(e, BackendOutage):
                message = (
                    f"No image server has been reachable for {describe_wait(e.waited_s)}; your quota "
                    "was refunded. Please try again later."
                )
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

    def _takes_previews(self, platform: str) -> bool:
        """Whether the platform's delivery shows previews; remembered per delivery object (an
        isinstance check against a runtime Protocol inspects every method, per job)."""
        delivery = self.service.deliveries.get(platform)
        known = self._previews.get(platform)
        if known is not None and known[0] is delivery:
            return known[1]
        # A metered delivery forwards on_preview; whether previews go anywhere is its inner one's say.
        takes = isinstance(getattr(delivery, "inner", delivery), PreviewDelivery)
        self._previews[platform] = (delivery, takes)
        return takes

    async def _requeue(self, view: JobView, error: BackendError) -> None:
        # A backend told how long to wait (a rate limit's Retry-After): retrying sooner would only
        # spend the attempt on the same refusal.
        delay = max(self.config.retry_backoff_s * view.attempts, error.retry_after_s or 0.0)
        log.warning("job %s: %s; retrying in %.0f s (attempt %d of %d)", view.id, error.message, delay,
                    view.attempts, self.config.max_attempts)  # fmt: skip
        await self._recorded(view.id, "requeue", lambda: self.claims.requeue(self.owner, view.id, delay))

    async def _succeed(self, view: JobView, images: list[GeneratedImage]) -> None:
        self._finishing.add(view.id)
        if len(images) != view.params.n:
            log.error("job %s: backend returned %d images for n=%d", view.id, len(images), view.params.n)
            await self._fail(view, "The image server returned an incomplete result; your quota was refunded.")
            return
        stored: list[ResultImage] = []
        try:
            for index, image in enumerate(images):
                # The key is the sha256 of the bytes (content-addressed storage): not hashed twice.
                key = await self.service.storage.put(image.png)
                width, height = _image_size(image.png) or (view.params.width, view.params.height)
                info = ImageInfo(index, int(image.seed), key, key, len(image.png), width, height)
                stored.append(ResultImage(info, image.png))
        except StorageError:
            # Logged by the storage with the path and the cause; retrying would fail the same way.
            await self._fail(view, STORAGE_WRITE_FAILED)
            return
        infos = [r.info for r in stored]
        recorded = await self._recorded(
            view.id, "store the result", lambda: self.results.store(self.owner, view.id, infos)
        )
        if recorded is None:
            log.warning("job %s: finished but no longer ours; discarding this result", view.id)
            return
        finished_at, attempt = recorded
        log.info("job %s succeeded: %d image(s)", view.id, len(stored))
        done = dataclasses.replace(
            view, state="succeeded", finished_at=finished_at, images=tuple(infos), error=None
        )
        await self._deliver(done, stored, attempt=attempt)

    async def _fail(self, view: JobView, message: str) -> None:
        self._finishing.add(view.id)
        if not await self._recorded(
            view.id, "record the failure", lambda: self.results.fail(self.owner, view.id, message)
        ):
            return
        view = await self._recorded(view.id, "read", lambda: self.service.get_job(view.id))
        await self._deliver(view)

    async def _deliver(
        self, view: JobView, images: list[ResultImage] | None = None, *, attempt: int | None = None
    ) -> None:
        """Count the attempt (unless `attempt` was counted with the result), call on_succeeded /
        on_failed, then mark the job delivered (each step only while we still hold the job). The
        job's dispatch slot is free meanwhile."""
        self._finishing.add(view.id)
        self._delivering.add(view.id)
        self._wake.set()  # a slot is free: claim the next job now
        try:
            await self._deliver_outcome(view, images, attempt)
        finally:
            self._delivering.discard(view.id)

    async def _deliver_outcome(
        self, view: JobView, images: list[ResultImage] | None, attempt: int | None
    ) -> None:
        adapter = self.service.deliveries.get(view.platform)
        if adapter is None:
            # No adapter of the platform in this process (it closed, or crashed): no verdict on the
            # delivery. The job stays undelivered; once our claim is released (a stop) or lapses,
            # a process with the adapter delivers it.
            log.info("job %s: no %s adapter here now; left to deliver later", view.id, view.platform)
            return
        if attempt is None:
            attempt = await self._recorded(
                view.id,
                "count the delivery attempt",
                lambda: self.results.count_delivery_attempt(self.owner, view.id),
            )
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
        if not ok and (self._stopping or self.service.deliveries.get(view.platform) is not adapter):
            # The adapter closed under the call (its HTTP session gone), or the call failed while
            # we are stopping: no verdict on the delivery. The job stays undelivered and is handed
            # back, so the next process delivers it (a stop closes the adapters only after the
            # dispatcher, but an adapter can also close or crash on its own).
            log.info(
                "job %s: its %s adapter closed during delivery; left to deliver later", view.id, view.platform
            )
            return
        await self._recorded(
            view.id, "mark delivered", lambda: self.results.mark_delivered(self.owner, view.id, ok=ok)
        )
        self.service.job_changed(view.id)


def _image_size(png: bytes) -> tuple[int, int] | None:
    """The real size of a returned image (a hosted API may not honour the requested size);
    reads the header only: a PNG's from its IHDR chunk directly (PIL's open costs more than the
    rest of storing a result), anything else through PIL."""
    if len(png) >= 24 and png.startswith(PNG_SIGNATURE) and png[12:16] == b"IHDR":
        width, height = struct.unpack(">II", png[16:24])
        if width and height:
            return width, height
    try:
        with Image.open(io.BytesIO(png)) as img:
            return img.size
    except (OSError, ValueError):
        return None


def waiting_message(event: BackendEvent) -> str:
    """What a user reads while their job waits out a server outage."""
    waited = float(event.extra.get("waited_s") or 0.0)
    since = f" (none reachable for {describe_wait(waited)})" if waited >= 1 else ""
    return f"waiting for an image server{since}; the job runs as soon as one is back"
