"""`CoreService`: the core's one entry point, wired from its parts.

Adapters see it as `bot.core.api.ImageService`; each of those methods is the method of the part
that does it:

- `bot.core.submission`: imagine, inpaint, cancel (idempotency, moderation, the quota charge);
- `bot.core.followups`: react, reroll, variation (who may start a job from whose result);
- `bot.core.operations`: image_to_image, upscale, zoom_out, pan, remix;
- `bot.core.queries`: get_job, job_for_message, queue_position, history, quota, image_bytes, stats;
- `bot.core.admin`: usage, limits, credits, usage resets, bans, audit_log;
- `bot.core.model_choice`: models (the listing), set_default_model, allow_models, allow_loras;
- `bot.core.place_settings`: place_rules, place_settings (the listing), allow_channels,
  set_channel_defaults, set_private (and set_role_limit, with `admin`);
- `bot.core.results`: attach_result_message, record_shown, remember_delivery;
- `bot.core.publications`: claim_publication, publication_failed (one process publishes a change).

The dispatcher uses `claims` (take, keep and hand back jobs), `results` (record outcomes and
deliveries), `queue` (fair order, positions to report), `storage`, `deliveries` and the signals
below. `quotas` and `audit` are shared by the parts. The signals are in-process only: several
processes share the database, and each polls it for what the others did.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Callable

from bot.backends.base import ModelCapabilities
from bot.config import CoreConfig
from bot.core import validate
from bot.core.admin import Admin
from bot.core.api import Actor, Delivery, JobView, Place, PlaceSettings
from bot.core.audit import Audit
from bot.core.claims import Claims
from bot.core.db import Database
from bot.core.fair_queue import FairQueue
from bot.core.followups import FollowUps
from bot.core.model_choice import ModelCatalog, ModelChoices
from bot.core.models import utcnow
from bot.core.operations import Operations
from bot.core.params import Limits
from bot.core.place_settings import PlaceSettingsPart
from bot.core.publications import Publications
from bot.core.queries import Queries
from bot.core.quotas import Quotas
from bot.core.results import Results
from bot.core.storage import ImageStorage
from bot.core.submission import Submissions
from bot.core.submit_activity import SubmitActivity

log = logging.getLogger("bot.core")

# How often `wait_for_job` looks at the database for jobs that another process finishes.
WAIT_POLL_S = 0.25


class CoreService:
    def __init__(
        self,
        db: Database,
        storage: ImageStorage,
        config: CoreConfig,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        rng: random.Random | None = None,
    ):
        self.db = db
        self.storage = storage
        self.config = config
        self.clock = clock
        # Seeds need no secrecy: a generator seeded once from the OS (per process) is enough, and a
        # SystemRandom reads the OS's random source on every seed.
        rng = rng or random.Random()
        # What the backend's model accepts, kept current by `bot.core.model_watch.ModelWatch`
        # (None until it reports, or when the backend doesn't): flags and defaults follow it.
        self.model: ModelCapabilities | None = None
        # The models the servers offer (their /v1/models), kept current by the same watch (empty:
        # servers that offer no choice).
        self.catalog = ModelCatalog()
        self.deliveries: dict[str, Delivery] = {}
        self._wakers: list[Callable[[], None]] = []
        self._cancel_listeners: list[Callable[[int], None]] = []
        self._job_events: dict[int, asyncio.Event] = {}
        self._limits: dict[str | None, tuple[ModelCapabilities | None, Limits]] = {}

        self.quotas = Quotas(db, config.quotas, clock)
        self.audit = Audit(db, clock)
        self.queue = FairQueue(
            db,
            clock=clock,
            max_queued=config.bot.max_queued_jobs,
            depth_check_s=config.bot.queue_depth_check_s,
            notify=config.database.notify,
        )
        self.claims = Claims(db, self.queue, lease_s=config.bot.lease_s, clock=clock)
        self.results = Results(db, self.quotas, lease_s=config.bot.lease_s, clock=clock)
        self.choices = ModelChoices(
            db,
            self.audit,
            catalog=lambda: self.catalog,
            default_capabilities=lambda: self.model,
            clock=clock,
        )
        self.places = PlaceSettingsPart(
            db, self.audit, bot=config.bot, choices=self.choices, limits=self.limits, clock=clock
        )
        # Counted while they run: dispatchers let them go first (bot.core.submit_activity).
        self.activity = SubmitActivity()
        submissions = Submissions(
            db,
            storage,
            config,
            self.quotas,
            self.audit,
            self.queue,
            clock=clock,
            rng=rng,
            limits=self.limits,
            choices=self.choices,
            place_settings=self.places,
            on_queued=self.wake,
            on_changed=self.job_changed,
            storming=self.activity.storming,
        )
        followups = FollowUps(db, config, submissions, rng=rng, limits=self.limits)
        operations = Operations(storage, config, submissions, followups, rng=rng, limits=self.limits)
        self._submissions = submissions
        self.warm_up = submissions.warm_up
        queries = Queries(db, storage, self.quotas, self.audit, self.queue, clock=clock)
        admin = Admin(db, self.quotas, self.audit, clock=clock)

        counted = self.activity.counted
        self.imagine = counted(submissions.imagine)
        self.inpaint = counted(submissions.inpaint)
        self.react = counted(followups.react)
        self.reroll = counted(followups.reroll)
        self.variation = counted(followups.variation)
        self.image_to_image = counted(operations.image_to_image)
        self.upscale = counted(operations.upscale)
        self.zoom_out = counted(operations.zoom_out)
        self.pan = counted(operations.pan)
        self.remix = counted(operations.remix)
        self.get_job = queries.get_job
        self.job_views = queries.job_views
        self.job_for_message = queries.job_for_message
        self.unattached_results = queries.unattached_results
        self.queue_position = queries.queue_position
        self.history = queries.history
        self.quota = queries.quota
        self.image_bytes = queries.image_bytes
        self.stats = queries.stats
        self.usage = admin.usage
        self.set_user_limit = admin.set_user_limit
        self.set_guild_limit = admin.set_guild_limit
        self.grant_credits = admin.grant_credits
        self.reset_usage = admin.reset_usage
        self.ban = admin.ban
        self.unban = admin.unban
        self.audit_log = admin.audit_log
        self.models = self.choices.listing
        self.set_default_model = self.choices.set_default_model
        self.allow_models = self.choices.allow_models
        self.allow_loras = self.choices.allow_loras
        self.place_rules = self.places.rules
        self.place_settings = self.places.listing
        self.allow_channels = self.places.allow_channels
        self.set_channel_defaults = self.places.set_channel_defaults
        self.set_private = self.places.set_private
        self._admin = admin
        self.attach_result_message = self.results.attach_result_message
        self.record_shown = self.results.record_shown
        self.remember_delivery = self.results.remember_delivery
        publications = Publications(db, clock)
        self.claim_publication = publications.claim
        self.publication_failed = publications.release

    def limits(self, model: str | None = None) -> Limits:
        """What a job on `model` (None: the servers' default) may ask for now: that model's
        capabilities within `[bot]`'s settings."""
        capabilities = self.choices.capabilities(model)
        known = self._limits.get(model)
        # Asked by every submission; the capabilities change only when the servers' report does
        # (a new object), so the limits of the same object are the same.
        if known is None or known[0] is not capabilities:
            if len(self._limits) > 1000:  # names the servers no longer offer
                self._limits.clear()
            known = self._limits[model] = (capabilities, Limits.of(self.config.bot, capabilities))
        return known[1]

    async def set_role_limit(
        self, actor: Actor, place: Place, role_id: str, daily_limit: int | None
    ) -> PlaceSettings:
        await self._admin.set_role_limit(actor, place, role_id, daily_limit)
        return await self.places.listing(actor, place)

    async def cancel(self, actor: Actor, job_id: int, place: Place | None = None) -> JobView:
        view = await self._submissions.cancel(actor, job_id, place)
        if view.state == "cancelled":
            for listener in self._cancel_listeners:
                listener(view.id)
        return view

    # -- deliveries ------------------------------------------------------------------------------

    def register_delivery(self, platform: str, delivery: Delivery) -> None:
        for name in ("on_queued", "on_progress", "on_waiting", "on_succeeded", "on_failed"):
            if not callable(getattr(delivery, name, None)):
                raise TypeError(f"delivery for {platform!r} has no {name}() method")
        self.deliveries[platform] = delivery
        log.info("delivery registered for %s", platform)
        self.wake()

    def unregister_delivery(self, platform: str) -> None:
        self.deliveries.pop(platform, None)

    # -- signals ---------------------------------------------------------------------------------

    def add_waker(self, waker: Callable[[], None]) -> None:
        """The dispatcher asks to be woken when this process queues a job."""
        self._wakers.append(waker)

    def add_cancel_listener(self, listener: Callable[[int], None]) -> None:
        """The dispatcher asks to hear of cancelled jobs (it stops running them)."""
        self._cancel_listeners.append(listener)

    def wake(self) -> None:
        for waker in self._wakers:
            waker()

    def job_changed(self, job_id: int) -> None:
        """A job of this process was finished or cancelled: wake whoever waits for it."""
        event = self._job_events.get(job_id)
        if event is not None:
            event.set()

    async def wait_for_job(self, job_id: int, timeout_s: float | None = None) -> JobView:
        job_id = validate.job_id(job_id)
        event = self._job_events.setdefault(job_id, asyncio.Event())

        async def poll() -> JobView:
            while True:
                event.clear()
                view = await self.get_job(job_id)
                if view.done:
                    return view
                # Woken at once by this process's dispatcher; the timeout covers other processes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WAIT_POLL_S):
                        await event.wait()

        try:
            async with asyncio.timeout(timeout_s):
                return await poll()
        finally:
            self._job_events.pop(job_id, None)
