"""`CoreService`: the implementation of `bot.core.api.ImageService`.

Submissions are one transaction each: the user row is locked (PostgreSQL `SELECT ... FOR UPDATE`;
SQLite transactions are `BEGIN IMMEDIATE`), the idempotency key is checked, the quota is read,
charged and the job row inserted before commit. Every change to a user's quota (charge, refund,
admin reset, credits) takes the same lock, so the quota is exact under any concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image, UnidentifiedImageError
from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from bot.backends.base import ModelCapabilities
from bot.config import CoreConfig
from bot.core import validate
from bot.core.api import (
    REACTION_ACTIONS,
    Actor,
    AuditEntry,
    BadParameters,
    Banned,
    DatabaseError,
    Delivery,
    ImageInfo,
    JobParams,
    JobView,
    Moderated,
    NotAdmin,
    NotFound,
    Overloaded,
    Place,
    QuotaExceeded,
    QuotaView,
    StatsView,
    UserStat,
)
from bot.core.db import Database, retry_unavailable
from bot.core.models import AuditLog, ImageRow, Job, QuotaLimit, QuotaUsage, User, utcnow
from bot.core.moderation import Moderator
from bot.core.params import MAX_ASPECT, Limits, ParsedPrompt, new_seed, parse_prompt, size_for_aspect
from bot.core.storage import ImageStorage

log = logging.getLogger("bot.core")

MAX_HISTORY = 100  # one page of history is plenty for a chat message; bigger asks are capped
# Idempotency keys are namespaced by platform into jobs.idempotency_key (VARCHAR(200)).
MAX_KEY_CHARS = 150
KEY_USED_BY_OTHER = "This request id was already used by someone else."
MAX_GRANT = 10_000  # a typo guard: nobody means to grant a million images
# Decompression-bomb guard: inputs are resized to about the model's default size anyway.
MAX_INPUT_PIXELS = 4096 * 4096


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
        self.rng = rng or random.SystemRandom()
        self.moderator = Moderator(config.moderation.banned_terms, config.moderation.enabled)
        # What the backend's model accepts, kept current by `bot.core.model_watch.ModelWatch`
        # (None until it reports, or when the backend doesn't): flags and defaults follow it.
        self.model: ModelCapabilities | None = None
        self.deliveries: dict[str, Delivery] = {}
        self._wakers: list[Callable[[], None]] = []
        self._job_events: dict[int, asyncio.Event] = {}

    # ------------------------------------------------------------------------------------------
    # wiring
    # ------------------------------------------------------------------------------------------

    def register_delivery(self, platform: str, delivery: Delivery) -> None:
        for name in ("on_queued", "on_progress", "on_succeeded", "on_failed"):
            if not callable(getattr(delivery, name, None)):
                raise TypeError(f"delivery for {platform!r} has no {name}() method")
        self.deliveries[platform] = delivery
        log.info("delivery registered for %s", platform)
        self.wake()

    def unregister_delivery(self, platform: str) -> None:
        self.deliveries.pop(platform, None)

    def add_waker(self, waker: Callable[[], None]) -> None:
        """The dispatcher asks to be woken when this process queues a job."""
        self._wakers.append(waker)

    def wake(self) -> None:
        for waker in self._wakers:
            waker()

    def job_changed(self, job_id: int) -> None:
        event = self._job_events.get(job_id)
        if event is not None:
            event.set()

    def limits(self) -> Limits:
        """What a job may ask for now: the model's capabilities within `[bot]`'s settings."""
        return Limits.of(self.config.bot, self.model)

    # ------------------------------------------------------------------------------------------
    # quota period
    # ------------------------------------------------------------------------------------------

    def period_for(self, now: dt.datetime) -> tuple[dt.date, dt.datetime, dt.datetime]:
        """(period day, period start, reset time) for `now`; the day starts at reset_hour_utc."""
        hour = self.config.quotas.reset_hour_utc
        shifted = now.astimezone(dt.UTC) - dt.timedelta(hours=hour)
        day = shifted.date()
        start = dt.datetime(day.year, day.month, day.day, hour, tzinfo=dt.UTC)
        return day, start, start + dt.timedelta(days=1)

    # ------------------------------------------------------------------------------------------
    # submitting
    # ------------------------------------------------------------------------------------------

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
        actor, place = self._who(actor, place)
        self._check_key(idempotency_key)
        delivery = validate.delivery(delivery)
        limits = self.limits()
        limits.require_task("txt2img", "text-to-image")
        parsed = parse_prompt(text, options, self.config.bot, limits=limits, rng=self.rng)
        return await self._submit(
            actor, place, "imagine", parsed, idempotency_key, delivery, task="txt2img", strength=None
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
        actor, place = self._who(actor, place)
        delivery = validate.delivery(delivery)
        existing = await self._existing(actor, idempotency_key)
        if existing is not None:
            return existing
        limits = self.limits()
        limits.require_task("inpaint", "inpainting")
        parsed = parse_prompt(prompt_text, options, self.config.bot, limits=limits, rng=self.rng)
        if parsed.aspect_ratio is not None:
            raise BadParameters(
                "ar", "--ar does not apply to inpainting: the size follows the image.", parsed.aspect_ratio
            )
        image_png, mask_png, width, height = await asyncio.to_thread(
            self._prepare_inpaint, image, mask, limits
        )
        image_key = await self.storage.put(image_png)
        mask_key = await self.storage.put(mask_png)
        parsed = ParsedPrompt(
            parsed.prompt,
            parsed.negative_prompt,
            parsed.seed,
            parsed.steps,
            parsed.n,
            parsed.guidance,
            width,
            height,
            None,
        )
        return await self._submit(
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

    def _decode(self, data: bytes, field: str) -> Image.Image:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BadParameters(field, f"The {field} must be image bytes, got {type(data).__name__}.")
        if not data:
            raise BadParameters(field, f"The {field} is empty.")
        if len(data) > self.config.bot.max_upload_bytes:
            raise BadParameters(
                field,
                f"The {field} is {len(data) / 1048576:.1f} MiB; at most "
                f"{self.config.bot.max_upload_bytes / 1048576:.0f} MiB.",
            )
        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_INPUT_PIXELS:
                raise BadParameters(field, f"The {field} is {img.width}x{img.height}; at most 4096x4096.")
            if img.format not in ("PNG", "JPEG", "WEBP"):
                raise BadParameters(field, f"The {field} must be PNG, JPEG or WebP, got {img.format}.")
            img.load()
        except BadParameters:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise BadParameters(field, f"The {field} is not a readable PNG, JPEG or WebP image.") from None
        return img

    def _prepare_inpaint(
        self, image: bytes, mask: bytes | None, limits: Limits
    ) -> tuple[bytes, bytes, int, int]:
        img = self._decode(image, "image")
        w, h = img.size
        if max(w / h, h / w) > MAX_ASPECT:
            raise BadParameters("image", f"The image is {w}x{h}; its sides must be within 4:1 of each other.")
        if mask is None:
            has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            if not has_alpha:
                raise BadParameters(
                    "mask",
                    "Give a mask, or an image whose transparent pixels mark the area to repaint "
                    "(this image has no transparency).",
                )
            alpha = img.convert("RGBA").getchannel("A")
            mask_img = alpha.point(lambda a: 255 if a < 128 else 0)
        else:
            m = self._decode(mask, "mask")
            if m.size != img.size:
                raise BadParameters(
                    "mask",
                    f"The mask is {m.width}x{m.height} but the image is {w}x{h}; they must be the same size.",
                )
            mask_img = m.convert("L").point(lambda v: 255 if v >= 128 else 0)
        if mask_img.getextrema()[1] == 0:
            raise BadParameters("mask", "The mask is empty: nothing is marked to repaint (white = repaint).")
        width, height = size_for_aspect(w, h, limits)
        rgb = img.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        mask_small = mask_img.resize((width, height), Image.Resampling.NEAREST)
        return _png(rgb), _png(mask_small), width, height

    async def react(
        self,
        actor: Actor,
        place: Place,
        message_id: str,
        emoji: str,
        *,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView | None:
        actor, place = self._who(actor, place)
        message_id = validate.ident("message", message_id, max_chars=validate.MAX_MESSAGE_ID_CHARS)
        if not isinstance(emoji, str):
            return None
        # Clients differ on the emoji variation selector (U+FE0F) and Slack sends ":name:" or "name".
        actions = {key.replace("\ufe0f", ""): value for key, value in REACTION_ACTIONS.items()}
        action = actions.get(emoji.strip().strip(":").replace("\ufe0f", ""))
        if action is None:
            return None
        delivery = validate.delivery(delivery)
        existing = await self._existing(actor, idempotency_key)
        if existing is not None:
            return existing
        try:
            parent = await self._parent(actor, place, None, message_id)
        except NotFound:
            return None
        kind, index = action
        if kind == "reroll":
            return await self._reroll(actor, place, parent, idempotency_key, delivery)
        assert index is not None
        return await self._variation(actor, place, parent, index, idempotency_key, delivery)

    async def _parent(self, actor: Actor, place: Place, job_id: int | None, message_id: str | None) -> Job:
        """The succeeded job a re-roll or variation starts from, if `actor` may use it:

        - it is on the actor's platform (a web user never reaches a Discord job);
        - its owner may always use it;
        - by result message, so by a reaction on it: anyone in the channel where it is shown (they
          see its prompt and images anyway); a result shown in no channel (the playground's) is its
          owner's alone;
        - by job id: besides the owner, only an admin acting in the job's guild/workspace.

        Anything else is NotFound, as for a job that does not exist: a number guessed in one place
        must not tell what someone else asked for in another.
        """
        if (job_id is None) == (message_id is None):
            raise ValueError("give exactly one of job_id and message_id")
        async with self.db.read() as s:
            if job_id is not None:
                query = select(Job, User).join(User, Job.user_id == User.id).where(Job.id == job_id)
            else:
                query = (
                    select(Job, User)
                    .join(User, Job.user_id == User.id)
                    .where(Job.platform == actor.platform, Job.result_message_id == message_id)
                    .order_by(Job.id.desc())
                    .limit(1)
                )
            row = (await s.execute(query)).first()
        if row is None or not self._may_use(row[0], row[1], actor, place, via_message=job_id is None):
            raise NotFound("That is not an image result I know about.")
        job = row[0]
        if job.state != "succeeded":
            raise BadParameters("job", f"Job {job.id} has no images yet (it is {job.state}).", job.id)
        return job

    @staticmethod
    def _may_use(job: Job, owner: User, actor: Actor, place: Place, *, via_message: bool) -> bool:
        """See `_parent`: may `actor`, acting in `place`, start a job from `job`'s result?"""
        if job.platform != actor.platform:
            return False
        if owner.platform_user_id == actor.user_id:
            return True
        shown_in = job.result_channel_id or job.channel_id
        if via_message and shown_in is not None and shown_in == place.channel_id:
            return True
        return actor.is_admin and job.guild_id == place.guild_id

    async def reroll(
        self,
        actor: Actor,
        place: Place,
        *,
        job_id: int | None = None,
        message_id: str | None = None,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        actor, place = self._who(actor, place)
        job_id, message_id = self._job_ref(job_id, message_id)
        delivery = validate.delivery(delivery)
        existing = await self._existing(actor, idempotency_key)
        if existing is not None:
            return existing
        parent = await self._parent(actor, place, job_id, message_id)
        return await self._reroll(actor, place, parent, idempotency_key, delivery)

    async def _reroll(
        self, actor: Actor, place: Place, parent: Job, idempotency_key: str, delivery: Mapping[str, Any]
    ) -> JobView:
        p = parent.params
        n = int(p["n"])
        parsed = ParsedPrompt(
            parent.prompt,
            parent.negative_prompt,
            new_seed(n, self.rng),
            int(p["steps"]),
            n,
            float(p["guidance"]),
            int(p["width"]),
            int(p["height"]),
            p.get("aspect_ratio"),
        )
        return await self._submit(
            actor,
            place,
            "reroll",
            parsed,
            idempotency_key,
            delivery,
            task=p.get("task", "txt2img"),
            strength=p.get("strength"),
            parent=parent,
            input_image_key=parent.input_image_key,
            mask_key=parent.mask_key,
        )

    async def variation(
        self,
        actor: Actor,
        place: Place,
        index: int,
        *,
        job_id: int | None = None,
        message_id: str | None = None,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        actor, place = self._who(actor, place)
        job_id, message_id = self._job_ref(job_id, message_id)
        if isinstance(index, bool) or not isinstance(index, int):
            raise BadParameters("image", f"The image number must be a whole number, got {index!r}.", index)
        delivery = validate.delivery(delivery)
        existing = await self._existing(actor, idempotency_key)
        if existing is not None:
            return existing
        parent = await self._parent(actor, place, job_id, message_id)
        return await self._variation(actor, place, parent, index, idempotency_key, delivery)

    async def _variation(
        self,
        actor: Actor,
        place: Place,
        parent: Job,
        index: int,
        idempotency_key: str,
        delivery: Mapping[str, Any],
    ) -> JobView:
        async with self.db.read() as s:
            images = (
                (
                    await s.execute(
                        select(ImageRow).where(ImageRow.job_id == parent.id).order_by(ImageRow.index)
                    )
                )
                .scalars()
                .all()
            )
        if not 0 <= index < len(images):
            raise BadParameters(
                "image", f"Image {index + 1} does not exist: that result has {len(images)} image(s).", index
            )
        self.limits().require_task("img2img", "variations (image-to-image)")
        source = images[index]
        p = parent.params
        n = int(p["n"])
        parsed = ParsedPrompt(
            parent.prompt,
            parent.negative_prompt,
            new_seed(n, self.rng),
            int(p["steps"]),
            n,
            float(p["guidance"]),
            source.width,
            source.height,
            p.get("aspect_ratio"),
        )
        return await self._submit(
            actor,
            place,
            "variation",
            parsed,
            idempotency_key,
            delivery,
            task="img2img",
            strength=self.config.bot.variation_strength,
            parent=parent,
            parent_image_index=index,
            input_image_key=source.storage_key,
        )

    @staticmethod
    def _who(actor: Actor, place: Place) -> tuple[Actor, Place]:
        """The actor and place of a request, checked (ids storable, display name cleaned)."""
        actor, place = validate.actor(actor), validate.place(place)
        if place.platform != actor.platform:
            raise BadParameters(
                "place", f"The place is on {place.platform!r} but the actor on {actor.platform!r}.", place
            )
        return actor, place

    @staticmethod
    def _job_ref(job_id: Any, message_id: Any) -> tuple[int | None, str | None]:
        if (job_id is None) == (message_id is None):
            raise BadParameters("job", "Give a job id or a result message id (exactly one).")
        if job_id is not None:
            return validate.job_id(job_id), None
        return None, validate.ident("message", message_id, max_chars=validate.MAX_MESSAGE_ID_CHARS)

    @staticmethod
    def _check_key(idempotency_key: str) -> None:
        validate.ident("idempotency_key", idempotency_key, max_chars=MAX_KEY_CHARS)

    async def _existing(self, actor: Actor, idempotency_key: str) -> JobView | None:
        self._check_key(idempotency_key)
        key = f"{actor.platform}:{idempotency_key}"
        async with self.db.read() as s:
            row = (
                await s.execute(
                    select(Job, User).join(User, Job.user_id == User.id).where(Job.idempotency_key == key)
                )
            ).first()
            if row is None:
                return None
            self._check_key_owner(row[1], actor)
            return await self._view(s, row[0], row[1], created=False)

    @staticmethod
    def _check_key_owner(owner: User, actor: Actor) -> None:
        """A platform's event ids are unique, and a retried event comes from the same user: the same
        key from someone else is not a retry, and must not hand them another user's job."""
        if owner.platform_user_id != actor.user_id:
            raise BadParameters("idempotency_key", KEY_USED_BY_OTHER)

    async def _lock_user(
        self, s: AsyncSession, platform: str, user_id: str, display_name: str | None
    ) -> User:
        """Create the user row if needed and lock it for this transaction, in one statement:
        `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` locks the row on PostgreSQL like
        `SELECT ... FOR UPDATE` (SQLite transactions here hold the database write lock anyway)."""
        insert = pg_insert if self.db.is_postgres else sqlite_insert
        now = self.clock()
        stmt = insert(User).values(
            platform=platform,
            platform_user_id=user_id,
            display_name=display_name or "",
            is_admin=False,
            banned=False,
            ban_reason="",
            bonus_credits=0,
            created_at=now,
            updated_at=now,
        )
        # The update must touch a column for the row to be locked and returned; keep the display
        # name fresh when the adapter sent one, else rewrite the platform with itself.
        changes = (
            {"display_name": stmt.excluded.display_name}
            if display_name
            else {"platform": stmt.excluded.platform}
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["platform", "platform_user_id"], set_=changes
        ).returning(User)
        query = select(User).from_statement(stmt).execution_options(populate_existing=True)
        return (await s.execute(query)).scalar_one()

    async def _limit_for(
        self, s: AsyncSession, platform: str, user_id: str, guild_id: str | None
    ) -> tuple[int, str]:
        conds = [(QuotaLimit.scope == "user") & (QuotaLimit.scope_id == user_id)]
        if guild_id is not None:
            conds.append((QuotaLimit.scope == "guild") & (QuotaLimit.scope_id == guild_id))
        rows = (
            await s.execute(
                select(QuotaLimit.scope, QuotaLimit.daily_limit).where(
                    QuotaLimit.platform == platform, or_(*conds)
                )
            )
        ).all()
        by_scope = {scope: limit for scope, limit in rows}
        if "user" in by_scope:
            return by_scope["user"], "user"
        if "guild" in by_scope:
            return by_scope["guild"], "guild"
        return self.config.quotas.daily_limit, "global"

    async def _used(self, s: AsyncSession, user_pk: int, period: dt.date) -> QuotaUsage | None:
        return (
            await s.execute(
                select(QuotaUsage)
                .where(QuotaUsage.user_id == user_pk, QuotaUsage.period == period)
                .execution_options(populate_existing=True)
            )
        ).scalar_one_or_none()

    async def _submit(
        self,
        actor: Actor,
        place: Place,
        kind: str,
        parsed: ParsedPrompt,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None,
        *,
        task: str,
        strength: float | None,
        parent: Job | None = None,
        parent_image_index: int | None = None,
        input_image_key: str | None = None,
        mask_key: str | None = None,
    ) -> JobView:
        key = f"{actor.platform}:{idempotency_key}"
        now = self.clock()
        period, _, reset_at = self.period_for(now)
        try:
            async with self.db.session() as s:
                user = await self._lock_user(s, actor.platform, actor.user_id, actor.display_name)
                user.is_admin = actor.is_admin
                # Checked again under the user lock: two deliveries of one event race to here.
                existing = (
                    await s.execute(select(Job).where(Job.idempotency_key == key))
                ).scalar_one_or_none()
                if existing is not None:
                    if existing.user_id != user.id:
                        raise BadParameters("idempotency_key", KEY_USED_BY_OTHER)
                    return await self._view(s, existing, user, created=False)
                if user.banned:
                    raise Banned(user.ban_reason)
                if kind in ("imagine", "inpaint"):
                    rule = self.moderator.check(parsed.prompt)
                    if rule is not None:
                        raise Moderated(rule.description)
                queued = (
                    await s.execute(select(func.count()).select_from(Job).where(Job.state == "queued"))
                ).scalar_one()
                if queued >= self.config.bot.max_queued_jobs:
                    raise Overloaded()
                limit, _source = await self._limit_for(s, actor.platform, actor.user_id, place.guild_id)
                usage = await self._used(s, user.id, period)
                used = usage.images_used if usage else 0
                remaining_today = max(0, limit - used)
                if parsed.n > remaining_today + user.bonus_credits:
                    raise QuotaExceeded(reset_at, parsed.n, remaining_today + user.bonus_credits, limit)
                daily = min(parsed.n, remaining_today)
                credits = parsed.n - daily
                if usage is None:
                    s.add(QuotaUsage(user_id=user.id, period=period, images_used=daily))
                else:
                    usage.images_used = used + daily
                user.bonus_credits -= credits
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
                job = Job(
                    idempotency_key=key,
                    user_id=user.id,
                    platform=actor.platform,
                    guild_id=place.guild_id,
                    channel_id=place.channel_id,
                    kind=kind,
                    prompt=parsed.prompt,
                    negative_prompt=parsed.negative_prompt,
                    params=params,
                    seed=parsed.seed,
                    seeds=list(parsed.seeds),
                    parent_job_id=parent.id if parent else None,
                    parent_image_index=parent_image_index,
                    input_image_key=input_image_key,
                    mask_key=mask_key,
                    state="queued",
                    attempts=0,
                    created_at=now,
                    delivery=dict(delivery or {}),
                    quota_period=period,
                    quota_daily=daily,
                    quota_credits=credits,
                    refunded=False,
                )
                s.add(job)
                await s.flush()
                view = await self._view(s, job, user, images=())
        except DatabaseError as e:
            if e.kind != "conflict":
                raise
            # Lost a race on the idempotency key (another process inserted it first): the whole
            # transaction, quota charge included, was rolled back; return the winner's job.
            existing_view = await self._existing(actor, idempotency_key)
            if existing_view is None:
                raise
            return existing_view
        log.info(
            "job %s queued: %s by %s:%s n=%d %dx%d steps=%d (daily %d, credits %d)",
            view.id, kind, actor.platform, actor.user_id, parsed.n, parsed.width, parsed.height,
            parsed.steps, daily, credits,
        )  # fmt: skip
        self.wake()
        return view

    async def cancel(self, actor: Actor, job_id: int, place: Place | None = None) -> JobView:
        actor, place = self._who(actor, place or Place(actor.platform))
        job_id = validate.job_id(job_id)
        async with self.db.session() as s:
            job = await s.get(Job, job_id)
            if job is None or job.platform != actor.platform:
                raise NotFound(f"There is no job {job_id}.")
            owner = await s.get(User, job.user_id)
            assert owner is not None
            if owner.platform_user_id != actor.user_id:
                if not actor.is_admin:
                    raise NotAdmin("cancelling someone else's job")
                if job.guild_id != place.guild_id:
                    # An admin of one guild/workspace is not an admin of the others.
                    raise NotFound(f"There is no job {job_id}.")
            owner = await self._lock_user(s, owner.platform, owner.platform_user_id, None)
            job = (
                await s.execute(select(Job).where(Job.id == job_id).execution_options(populate_existing=True))
            ).scalar_one()
            if job.state == "queued":
                job.state = "cancelled"
                job.finished_at = self.clock()
                job.delivered_at = job.finished_at  # the adapter that cancels tells the user
                await self.refund(s, job, owner)
                if actor.is_admin and owner.platform_user_id != actor.user_id:
                    self._audit(s, actor, "cancel", f"job:{job_id}", {"owner": owner.platform_user_id})
            view = await self._view(s, job, owner)
        self.job_changed(job_id)
        return view

    async def refund(self, s: AsyncSession, job: Job, user: User) -> None:
        """Give back what the job was charged (caller holds the user lock). Once per job; the daily
        part only while its period lasts (a new period has a fresh allowance anyway)."""
        if job.refunded:
            return
        job.refunded = True
        period, _, _ = self.period_for(self.clock())
        if job.quota_daily and job.quota_period == period:
            usage = await self._used(s, user.id, period)
            if usage is not None:
                usage.images_used = max(0, usage.images_used - job.quota_daily)
        if job.quota_credits:
            user.bonus_credits += job.quota_credits

    # ------------------------------------------------------------------------------------------
    # reading
    # ------------------------------------------------------------------------------------------

    async def _view(
        self,
        s: AsyncSession,
        job: Job,
        user: User | None = None,
        *,
        created: bool = True,
        images: tuple[ImageInfo, ...] | None = None,
        position: int | None = None,
    ) -> JobView:
        if user is None:
            user = await s.get(User, job.user_id)
            assert user is not None
        if images is None:
            rows = (
                (await s.execute(select(ImageRow).where(ImageRow.job_id == job.id).order_by(ImageRow.index)))
                .scalars()
                .all()
            )
            images = tuple(
                ImageInfo(r.index, r.seed, r.storage_key, r.sha256, r.size_bytes, r.width, r.height)
                for r in rows
            )
        p = job.params
        return JobView(
            id=job.id,
            kind=job.kind,  # type: ignore[arg-type]
            state=job.state,  # type: ignore[arg-type]
            platform=job.platform,
            user_id=user.platform_user_id,
            display_name=user.display_name,
            guild_id=job.guild_id,
            channel_id=job.channel_id,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            params=JobParams(
                width=int(p["width"]),
                height=int(p["height"]),
                steps=int(p["steps"]),
                guidance=float(p["guidance"]),
                n=int(p["n"]),
                seed=int(job.seed),
                seeds=tuple(int(x) for x in job.seeds),
                strength=p.get("strength"),
                aspect_ratio=p.get("aspect_ratio"),
            ),
            parent_id=job.parent_job_id,
            parent_image_index=job.parent_image_index,
            error=job.error,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            result_message_id=job.result_message_id,
            delivery=dict(job.delivery or {}),
            images=images,
            attempts=job.attempts,
            created=created,
            position=position,
        )

    async def job_view(self, job_id: int) -> JobView:
        job_id = validate.job_id(job_id)
        async with self.db.read() as s:
            job = await s.get(Job, job_id)
            if job is None:
                raise NotFound(f"There is no job {job_id}.")
            return await self._view(s, job)

    get_job = job_view

    async def job_views(self, job_ids: list[int]) -> dict[int, JobView]:
        """Views of several jobs in one query (without images: for queued jobs)."""
        job_ids = [validate.job_id(j) for j in job_ids]
        async with self.db.read() as s:
            rows = (
                await s.execute(
                    select(Job, User).join(User, Job.user_id == User.id).where(Job.id.in_(job_ids))
                )
            ).all()
            return {job.id: await self._view(s, job, user, images=()) for job, user in rows}

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
            return None if job is None else await self._view(s, job)

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
                    "result_message_id": str(message_id),
                    "delivered_at": func.coalesce(Job.delivered_at, self.clock()),
                }
                if channel_id is not None:
                    values["result_channel_id"] = str(channel_id)
                result = await s.execute(update(Job).where(Job.id == job_id).values(**values))
                if result.rowcount == 0:
                    raise NotFound(f"There is no job {job_id}.")

        # The result is posted already: recording it is worth waiting out a database blip for.
        await retry_unavailable(write, within_s=self.config.bot.lease_s, what=f"job {job_id}: record result")

    async def remember_delivery(self, job_id: int, values: Mapping[str, str]) -> None:
        job_id = validate.job_id(job_id)
        values = validate.delivery({str(k): str(v) for k, v in values.items()})

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
                job.delivery = {**(job.delivery or {}), **values}

        await retry_unavailable(
            write, within_s=self.config.bot.lease_s, what=f"job {job_id}: remember delivery"
        )

    async def wait_for_job(self, job_id: int, timeout_s: float | None = None) -> JobView:
        job_id = validate.job_id(job_id)
        event = self._job_events.setdefault(job_id, asyncio.Event())

        async def poll() -> JobView:
            while True:
                event.clear()
                view = await self.job_view(job_id)
                if view.done:
                    return view
                # Woken at once by this process's dispatcher; the timeout covers other processes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.25):
                        await event.wait()

        try:
            async with asyncio.timeout(timeout_s):
                return await poll()
        finally:
            self._job_events.pop(job_id, None)

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
            return [await self._view(s, j, user) for j in jobs]

    async def _quota_view(
        self, s: AsyncSession, platform: str, user_id: str, guild_id: str | None
    ) -> QuotaView:
        period, _, reset_at = self.period_for(self.clock())
        user = (
            await s.execute(
                select(User)
                .where(User.platform == platform, User.platform_user_id == user_id)
                .execution_options(populate_existing=True)
            )
        ).scalar_one_or_none()
        limit, source = await self._limit_for(s, platform, user_id, guild_id)
        used = 0
        credits = 0
        banned = False
        if user is not None:
            usage = await self._used(s, user.id, period)
            used = usage.images_used if usage else 0
            credits = user.bonus_credits
            banned = user.banned
        remaining_today = max(0, limit - used)
        return QuotaView(
            platform=platform,
            user_id=user_id,
            daily_limit=limit,
            limit_source=source,  # type: ignore[arg-type]
            used_today=used,
            remaining_today=remaining_today,
            bonus_credits=credits,
            remaining=remaining_today + credits,
            reset_at=reset_at,
            banned=banned,
        )

    async def quota(self, actor: Actor, place: Place) -> QuotaView:
        actor, place = self._who(actor, place)
        async with self.db.read() as s:
            return await self._quota_view(s, actor.platform, actor.user_id, place.guild_id)

    # ------------------------------------------------------------------------------------------
    # admin
    # ------------------------------------------------------------------------------------------

    def _audit(
        self, s: AsyncSession, actor: Actor, action: str, target: str, details: Mapping[str, Any]
    ) -> None:
        s.add(
            AuditLog(
                created_at=self.clock(),
                actor_platform=actor.platform,
                actor_user_id=actor.user_id,
                action=action,
                target=target,
                details=dict(details),
            )
        )

    async def _require_admin(self, actor: Actor, operation: str, target: str = "") -> None:
        if actor.is_admin:
            return
        # Refusals are audited too: repeated attempts are worth seeing.
        async with self.db.session() as s:
            self._audit(s, actor, f"refused:{operation}", target, {})
        raise NotAdmin(operation)

    async def usage(self, actor: Actor, place: Place, target_user_id: str) -> QuotaView:
        actor, place = self._who(actor, place)
        target_user_id = validate.ident("user", target_user_id)
        await self._require_admin(actor, "usage", target_user_id)
        async with self.db.session() as s:
            self._audit(s, actor, "usage", f"user:{target_user_id}", {"guild_id": place.guild_id})
            return await self._quota_view(s, actor.platform, target_user_id, place.guild_id)

    async def _set_limit(
        self, s: AsyncSession, platform: str, scope: str, scope_id: str, limit: int | None
    ) -> None:
        row = (
            await s.execute(
                select(QuotaLimit).where(
                    QuotaLimit.platform == platform,
                    QuotaLimit.scope == scope,
                    QuotaLimit.scope_id == scope_id,
                )
            )
        ).scalar_one_or_none()
        if limit is None:
            if row is not None:
                await s.delete(row)
        elif row is None:
            s.add(
                QuotaLimit(
                    platform=platform,
                    scope=scope,
                    scope_id=scope_id,
                    daily_limit=limit,
                    updated_at=self.clock(),
                )
            )
        else:
            row.daily_limit = limit

    @staticmethod
    def _check_limit(limit: int | None) -> None:
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 100_000
        ):
            raise BadParameters(
                "limit", f"The daily limit must be a whole number from 0 to 100000, got {limit!r}.", limit
            )

    async def set_user_limit(self, actor: Actor, target_user_id: str, daily_limit: int | None) -> QuotaView:
        actor = validate.actor(actor)
        target_user_id = validate.ident("user", target_user_id)
        await self._require_admin(actor, "set_user_limit", target_user_id)
        self._check_limit(daily_limit)
        async with self.db.session() as s:
            await self._lock_user(s, actor.platform, target_user_id, None)
            await self._set_limit(s, actor.platform, "user", target_user_id, daily_limit)
            self._audit(s, actor, "set_user_limit", f"user:{target_user_id}", {"daily_limit": daily_limit})
            await s.flush()
            return await self._quota_view(s, actor.platform, target_user_id, None)

    async def set_guild_limit(self, actor: Actor, guild_id: str, daily_limit: int | None) -> None:
        actor = validate.actor(actor)
        guild_id = validate.ident("guild", guild_id)
        await self._require_admin(actor, "set_guild_limit", guild_id)
        self._check_limit(daily_limit)
        async with self.db.session() as s:
            await self._set_limit(s, actor.platform, "guild", guild_id, daily_limit)
            self._audit(s, actor, "set_guild_limit", f"guild:{guild_id}", {"daily_limit": daily_limit})

    async def grant_credits(self, actor: Actor, target_user_id: str, amount: int) -> QuotaView:
        actor = validate.actor(actor)
        target_user_id = validate.ident("user", target_user_id)
        await self._require_admin(actor, "grant_credits", target_user_id)
        if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= MAX_GRANT:
            raise BadParameters(
                "amount", f"Credits must be a whole number from 1 to {MAX_GRANT}, got {amount!r}.", amount
            )
        async with self.db.session() as s:
            user = await self._lock_user(s, actor.platform, target_user_id, None)
            user.bonus_credits += amount
            self._audit(
                s,
                actor,
                "grant_credits",
                f"user:{target_user_id}",
                {"amount": amount, "balance": user.bonus_credits},
            )
            await s.flush()
            return await self._quota_view(s, actor.platform, target_user_id, None)

    async def reset_usage(self, actor: Actor, target_user_id: str) -> QuotaView:
        actor = validate.actor(actor)
        target_user_id = validate.ident("user", target_user_id)
        await self._require_admin(actor, "reset_usage", target_user_id)
        period, _, _ = self.period_for(self.clock())
        async with self.db.session() as s:
            user = await self._lock_user(s, actor.platform, target_user_id, None)
            usage = await self._used(s, user.id, period)
            before = usage.images_used if usage else 0
            if usage is not None:
                usage.images_used = 0
            self._audit(s, actor, "reset_usage", f"user:{target_user_id}", {"used_before": before})
            await s.flush()
            return await self._quota_view(s, actor.platform, target_user_id, None)

    async def ban(self, actor: Actor, target_user_id: str, reason: str = "") -> None:
        actor = validate.actor(actor)
        target_user_id = validate.ident("user", target_user_id)
        reason = validate.text("reason", reason, max_chars=validate.MAX_REASON_CHARS, what="The ban reason")
        await self._require_admin(actor, "ban", target_user_id)
        if target_user_id == actor.user_id:
            raise BadParameters("user", "You cannot ban yourself.", target_user_id)
        async with self.db.session() as s:
            user = await self._lock_user(s, actor.platform, target_user_id, None)
            user.banned = True
            user.ban_reason = reason
            self._audit(s, actor, "ban", f"user:{target_user_id}", {"reason": reason})

    async def unban(self, actor: Actor, target_user_id: str) -> None:
        actor = validate.actor(actor)
        target_user_id = validate.ident("user", target_user_id)
        await self._require_admin(actor, "unban", target_user_id)
        async with self.db.session() as s:
            user = await self._lock_user(s, actor.platform, target_user_id, None)
            user.banned = False
            user.ban_reason = ""
            self._audit(s, actor, "unban", f"user:{target_user_id}", {})

    async def stats(self, actor: Actor, place: Place, top: int = 5) -> StatsView:
        actor, place = self._who(actor, place)
        top = validate.count("top", top, 1, 25)
        await self._require_admin(actor, "stats", place.guild_id or "")
        _, start, _ = self.period_for(self.clock())
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
            self._audit(s, actor, "stats", f"guild:{place.guild_id}" if place.guild_id else "platform", {})
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

    async def audit_log(self, actor: Actor, limit: int = 20) -> list[AuditEntry]:
        actor = validate.actor(actor)
        limit = validate.count("limit", limit, 1, MAX_HISTORY)
        await self._require_admin(actor, "audit_log")
        async with self.db.read() as s:
            rows = (
                (
                    await s.execute(
                        select(AuditLog)
                        .where(AuditLog.actor_platform == actor.platform)
                        .order_by(AuditLog.id.desc())
                        .limit(limit)
                    )
                )
                .scalars()
                .all()
            )
        return [
            AuditEntry(
                r.id, r.created_at, r.actor_platform, r.actor_user_id, r.action, r.target, dict(r.details)
            )
            for r in rows
        ]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
