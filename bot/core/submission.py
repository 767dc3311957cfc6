"""Submitting and cancelling jobs.

A submission's parameters (flags, the channel's defaults, the model) are resolved here; then it
joins the next batch of the process's submit writer (`bot.core.submit_batch`), which writes every
submission waiting in one transaction of a constant number of statements: the users locked, the
idempotency keys checked, then per submission the ban, the moderation rules, the place, the
queue's room and the quota, and the jobs inserted with their place in the fair order (see "Submit
and dispatch" in docs/bot-core.md). The same key again returns the same job (`created=False`) and
charges nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import select

from bot.backends.base import Task
from bot.config import CoreConfig
from bot.core import validate
from bot.core.api import (
    Actor,
    BadParameters,
    CoreError,
    DatabaseError,
    JobKind,
    JobView,
    NotAdmin,
    NotFound,
    Place,
)
from bot.core.audit import Audit
from bot.core.db import Database
from bot.core.fair_queue import FairQueue
from bot.core.group_commit import GroupCommit
from bot.core.model_choice import ModelChoices
from bot.core.models import Job, User
from bot.core.moderation import Moderator
from bot.core.params import Limits, ModelRequest, ParsedPrompt, model_request, parse_prompt
from bot.core.place_settings import PlaceSettingsPart
from bot.core.quotas import Quotas
from bot.core.storage import ImageStorage
from bot.core.submit_batch import KEY_USED_BY_OTHER, MAX_BATCH, PendingJob, SubmitWriter
from bot.core.uploads import prepare_inpaint
from bot.core.views import job_view

log = logging.getLogger("bot.core")

# The platform of the warm-up's submission (`Submissions.warm_up`), which is never kept.
WARM_UP = "warm-up"


class Submissions:
    def __init__(
        self,
        db: Database,
        storage: ImageStorage,
        config: CoreConfig,
        quotas: Quotas,
        audit: Audit,
        queue: FairQueue,
        *,
        clock: Callable[[], dt.datetime],
        rng: random.Random,
        limits: Callable[[str | None], Limits],
        choices: ModelChoices,
        place_settings: PlaceSettingsPart,
        on_queued: Callable[[], None],
        on_changed: Callable[[int], None],
        storming: Callable[[], bool] = lambda: False,
    ):
        self.db = db
        self.storage = storage
        self.config = config
        self.quotas = quotas
        self.audit = audit
        self.queue = queue
        self.clock = clock
        self.rng = rng
        self.limits = limits
        self.choices = choices
        self.place_settings = place_settings
        self.moderator = Moderator(config.moderation.banned_terms, config.moderation.enabled)
        self.on_queued = on_queued
        self.on_changed = on_changed
        self.writer = SubmitWriter(db, quotas, queue, place_settings, self.moderator, storming=storming)
        # Concurrent submissions share a transaction (see bot.core.submit_batch).
        self._batches: GroupCommit[PendingJob, JobView] = GroupCommit(
            "submit", self._write_batch, max_batch=MAX_BATCH
        )

    async def imagine(
        self,
        actor: Actor,
        place: Place,
        text: str,
        options: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        # The idempotency key is checked inside the submit transaction (a retried event has the same
        # text, so parsing it again gives the same answer).
        actor, place = validate.actor_and_place(actor, place)
        validate.idempotency_key(idempotency_key)
        delivery = validate.delivery(delivery)
        parsed = await self._parse_imagine(place, text, options, self.rng)
        return await self.submit(
            actor, place, "imagine", parsed, idempotency_key, delivery, task="txt2img", strength=None
        )

    async def _parse_imagine(
        self, place: Place, text: str, options: Mapping[str, Any] | None, rng: random.Random
    ) -> ParsedPrompt:
        options = await self.place_settings.with_defaults(place, text, options)  # the channel's
        limits, chosen = await self.choose(place, text, options)
        limits.require_task("txt2img", "text-to-image")
        return parse_prompt(text, options, self.config.bot, limits=limits, rng=rng, chosen=chosen)

    async def warm_up(self) -> None:
        """Run an /imagine through every step of a submission once, the batch's transaction
        included, and roll it back: the statements are compiled (and on PostgreSQL prepared on a
        pooled connection) before the first users come, rather than in their first batch (a burst
        just after a start waited 1.7x as long as the next one). Nothing is kept; a failure is
        logged and forgotten (the first real submission then pays as before)."""
        actor, place = Actor(WARM_UP, "warm-up", "warm-up"), Place(WARM_UP, "warm-up", "warm-up")
        try:
            parsed = await self._parse_imagine(place, "warm up", None, random.Random(0))
            await self.submit(
                actor, place, "imagine", parsed, "warm-up", None, task="txt2img", strength=None, dry_run=True
            )
        except CoreError as e:
            # Refused (a full queue, a rule of the place): its statements ran all the same.
            log.info("submission warm-up refused (%s); its statements are compiled", type(e).__name__)
        except Exception as e:  # noqa: BLE001 - an optimisation: never a reason not to start
            log.warning(
                "submission warm-up failed (%s: %s); the first submissions compile instead",
                type(e).__name__,
                e,
            )

    async def inpaint(
        self,
        actor: Actor,
        place: Place,
        prompt_text: str,
        image: bytes,
        mask: bytes | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        actor, place = validate.actor_and_place(actor, place)
        delivery = validate.delivery(delivery)
        # Before the uploads are decoded and stored: a retried event costs one query, not that work.
        existing = await self.existing(actor, idempotency_key)
        if existing is not None:
            return existing
        options = await self.place_settings.with_defaults(place, prompt_text, options, aspect_ratio=False)
        limits, chosen = await self.choose(place, prompt_text, options)
        limits.require_task("inpaint", "inpainting")
        parsed = parse_prompt(
            prompt_text, options, self.config.bot, limits=limits, rng=self.rng, chosen=chosen
        )
        if parsed.aspect_ratio is not None:
            raise BadParameters(
                "ar", "--ar does not apply to inpainting: the size follows the image.", parsed.aspect_ratio
            )
        inputs = await asyncio.to_thread(
            prepare_inpaint,
            image,
            mask,
            max_bytes=self.config.bot.max_upload_bytes,
            limits=limits,
        )
        image_key = await self.storage.put(inputs.image_png)
        mask_key = await self.storage.put(inputs.mask_png)
        parsed = dataclasses.replace(parsed, width=inputs.width, height=inputs.height)
        return await self.submit(
            actor,
            place,
            "inpaint",
            parsed,
            idempotency_key,
            delivery,
            task="inpaint",
            strength=self.config.bot.inpaint_strength,
            input_image_key=image_key,
            mask_key=mask_key,
        )

    async def choose(
        self, place: Place, text: str, options: Mapping[str, Any] | None
    ) -> tuple[Limits, ModelRequest]:
        """The model and LoRAs `text`'s flags and `options` ask for, checked against what the servers
        offer and what the place allows, and the limits of that model (the other flags' bounds)."""
        choice = await self.choices.choose(place, model_request(text, options))
        return self.limits(choice.model), ModelRequest(choice.model, choice.loras)

    async def existing(self, actor: Actor, idempotency_key: str) -> JobView | None:
        """The job already submitted with this key, if any (BadParameters if someone else's)."""
        validate.idempotency_key(idempotency_key)
        key = f"{actor.platform}:{idempotency_key}"
        async with self.db.read() as s:
            row = (
                await s.execute(
                    select(Job, User).join(User, Job.user_id == User.id).where(Job.idempotency_key == key)
                )
            ).first()
            if row is None:
                return None
            job, owner = row
            # A platform's event ids are unique, and a retried event comes from the same user: the
            # same key from someone else is not a retry, and must not hand them another user's job.
            if owner.platform_user_id != actor.user_id:
                raise BadParameters("idempotency_key", KEY_USED_BY_OTHER)
            return await job_view(s, job, owner, created=False)

    async def submit(
        self,
        actor: Actor,
        place: Place,
        kind: JobKind,
        parsed: ParsedPrompt,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None,
        *,
        task: Task,
        strength: float | None,
        parent: Job | None = None,
        parent_image_index: int | None = None,
        input_image_key: str | None = None,
        mask_key: str | None = None,
        detail: str | None = None,
        model: str | None = None,
        dry_run: bool = False,
    ) -> JobView:
        """Queue a job whose parameters are resolved (`actor`, `place` and `delivery` checked).
        `detail` names an operation's variant ("2x", "left", "subtle"); `model` a server model that
        replaces `parsed.model` (an upscaler: then without the parsed LoRAs, made for another model).
        `dry_run`: every step runs, the batch's transaction included, and nothing is kept (its view
        names a job that does not exist; `warm_up`)."""
        loras = parsed.loras if model is None or model == parsed.model else ()
        model = model if model is not None else parsed.model
        key = f"{actor.platform}:{idempotency_key}"
        now = self.clock()
        params: dict[str, Any] = {
            "task": task,
            "width": parsed.width,
            "height": parsed.height,
            "steps": parsed.steps,
            "guidance": parsed.guidance,
            "n": parsed.n,
            "strength": strength,
            "aspect_ratio": parsed.aspect_ratio,
        }
        if detail is not None:
            params["detail"] = detail
        # Every column, the ones the batch decides included: a multi-row INSERT takes rows alike.
        row: dict[str, Any] = {
            "idempotency_key": key,
            "user_id": None,
            "platform": actor.platform,
            "guild_id": place.guild_id,
            "channel_id": place.channel_id,
            "kind": kind,
            "prompt": parsed.prompt,
            "negative_prompt": parsed.negative_prompt,
            "params": params,
            "seed": parsed.seed,
            "seeds": list(parsed.seeds),
            "parent_job_id": parent.id if parent else None,
            "parent_image_index": parent_image_index,
            "input_image_key": input_image_key,
            "mask_key": mask_key,
            "model": model,
            "loras": [{"name": lora.name, "weight": lora.weight} for lora in loras],
            "state": "queued",
            "fair_round": None,
            "attempts": 0,
            "created_at": now,
            "delivery": dict(delivery or {}),
            "quota_period": None,
            "quota_daily": 0,
            "quota_credits": 0,
            "refunded": False,
            "delivery_attempts": 0,
            "error": None,
            "started_at": None,
            "finished_at": None,
            "result_message_id": None,
        }
        pending = PendingJob(actor, place, key, now, parsed.n, row)
        if dry_run:
            outcome = (await self.writer.write([pending], dry_run=True))[0]
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        try:
            view = await self._batches(pending)
        except DatabaseError as e:
            if e.kind != "conflict":
                raise
            # Lost a race on the idempotency key (another process inserted it first): the whole
            # transaction, quota charge included, was rolled back; return the winner's job.
            existing_view = await self.existing(actor, idempotency_key)
            if existing_view is None:
                raise
            return existing_view
        if view.created:
            log.info(
                "job %s queued: %s by %s:%s n=%d %dx%d steps=%d",
                view.id, kind, actor.platform, actor.user_id, parsed.n, parsed.width, parsed.height,
                parsed.steps,
            )  # fmt: skip
        return view

    async def _write_batch(self, batch: list[PendingJob]) -> list[JobView | BaseException]:
        outcomes = await self.writer.write(batch)
        if any(isinstance(o, JobView) and o.created for o in outcomes):
            self.on_queued()  # once per batch: one wake-up for all its jobs
        return outcomes

    async def cancel(self, actor: Actor, job_id: int, place: Place | None = None) -> JobView:
        actor, place = validate.actor_and_place(actor, place or Place(actor.platform))
        job_id = validate.job_id(job_id)
        async with self.db.session() as s:
            job = await s.get(Job, job_id)
            if job is None or job.platform != actor.platform:
                raise NotFound(f"There is no job {job_id}.")
            owner = await s.get(User, job.user_id)
            assert owner is not None, f"job {job_id} has no user row"  # a foreign key guarantees one
            if owner.platform_user_id != actor.user_id:
                if not actor.is_admin:
                    raise NotAdmin("cancelling someone else's job")
                if job.guild_id != place.guild_id:
                    # An admin of one guild/workspace is not an admin of the others.
                    raise NotFound(f"There is no job {job_id}.")
            owner = await self.quotas.lock_user(s, owner.platform, owner.platform_user_id)
            job = (
                await s.execute(select(Job).where(Job.id == job_id).execution_options(populate_existing=True))
            ).scalar_one()
            if job.state in ("queued", "running"):
                # A running job's holder loses it here: its lease is gone, so it can record nothing
                # (its result is discarded), and its dispatcher stops the run when it hears of it.
                job.state = "cancelled"
                job.lease_owner = None
                job.lease_until = None
                job.finished_at = self.clock()
                job.delivered_at = job.finished_at  # the adapter that cancels tells the user
                await self.quotas.refund(s, job, owner)
                if actor.is_admin and owner.platform_user_id != actor.user_id:
                    self.audit.record(s, actor, "cancel", f"job:{job_id}", {"owner": owner.platform_user_id})
            view = await job_view(s, job, owner)
        self.on_changed(job_id)
        return view
