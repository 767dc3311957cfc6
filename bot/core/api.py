"""The public face of the bot core: what the chat adapters (Discord, Slack, the web playground) use.

Adapters translate, the core decides. An adapter turns a platform event into the plain values below,
calls an `ImageService` method, and turns the returned value or the raised `CoreError` into a message.
Nothing here imports discord, slack_bolt, gradio or aiohttp.web, and nothing here holds platform
objects: everything an adapter needs to deliver a result after a restart travels in the job's
`delivery` mapping (JSON), which the adapter chooses and the core stores on the job row.

Life of a job, as an adapter sees it:

1. At start-up: `service.register_delivery("discord", my_delivery)`. The dispatcher only claims jobs
   of platforms with a registered delivery in this process, so a Slack-only process never picks up a
   Discord job it could not deliver.
2. On a command: `job = await service.imagine(actor, place, text, options, idempotency_key=...,
   delivery={...})`. It returns at once (the job is a `queued` row, quota is reserved) or raises a
   `CoreError`. Reply (or defer) with `job`. Submitting the same idempotency key again returns the
   same job with `job.created == False` (a Slack retry or a double click is not a second job).
3. Later the core calls the delivery: `on_queued(job, position)` when the queue position changes,
   `on_progress(job, step, total)` (at most once per `[bot] progress_interval_s` per job, plus
   `step == 0` when the job starts), `on_preview(job, step, total, png)` if the delivery implements
   `PreviewDelivery` (at most once per `[bot] preview_interval_s`), then exactly one of `on_succeeded(job, images)` or
   `on_failed(job, message)`. Quota is refunded by the core before `on_failed` is called.
4. After posting the result: `await service.attach_result_message(job.id, message_id)`, so that
   reactions and buttons on that message resolve to the job row (they survive restarts).
5. Reactions / buttons: `await service.react(actor, place, message_id, emoji, idempotency_key=...)`,
   or `reroll(...)` / `variation(...)` directly from a button whose custom_id holds the job id.

Errors: every refusal is a `CoreError` subclass with a short user-facing `.message` (no traceback,
safe to show). Map them in one place per adapter; anything else is a bug, log it. Every value an
adapter passes in (text, ids, the delivery mapping) is checked by the core (`bot.core.validate`):
what the database could not store is refused with `BadParameters` naming the field, and a failure
of the database or the image storage itself comes out as a `ServiceError` (`DatabaseError`,
`StorageError`), never as a driver's exception.

Delivery callbacks are awaited by the dispatcher; an exception raised from one is logged and does not
change the job's state. Keep them short (post / edit a message) and never block the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

from bot.backends.base import LoraSpec

__all__ = [
    "Actor",
    "Place",
    "JobKind",
    "JobState",
    "LimitSource",
    "JobParams",
    "ImageInfo",
    "ResultImage",
    "JobView",
    "QuotaView",
    "StatsView",
    "UserStat",
    "AuditEntry",
    "LoraSpec",
    "ModelEntry",
    "ModelListing",
    "ChannelDefaults",
    "PlaceRules",
    "PlaceSettings",
    "Delivery",
    "ImageService",
    "CoreError",
    "BadParameters",
    "QuotaExceeded",
    "Moderated",
    "Banned",
    "NotAdmin",
    "NotAllowedHere",
    "Overloaded",
    "NotFound",
    "BackendUnavailable",
    "ServiceError",
    "DatabaseError",
    "StorageError",
    "REACTION_ACTIONS",
]

JobKind = Literal["imagine", "inpaint", "variation", "reroll", "upscale", "zoom", "pan", "remix"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# Where a user's daily limit comes from: a per-user override, the highest limit of the user's roles
# (Discord roles) in the guild, the guild/workspace default, the config.
LimitSource = Literal["user", "role", "guild", "global"]


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    """Who asks. `platform` is "discord", "slack", "web" (the playground), ...; `user_id` is the platform's id.

    `is_admin` is decided by the adapter (Discord: Manage Server or a configured role; Slack:
    configured user ids or workspace admins) and enforced by the core for admin operations.
    `role_ids` are the user's roles in the place's guild (Discord role ids; empty on platforms
    without roles): the highest daily limit an admin set for one of them applies.
    """

    platform: str
    user_id: str
    display_name: str = ""
    is_admin: bool = False
    role_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Place:
    """Where. `guild_id` is the Discord guild / Slack workspace (team id); None for DMs and the
    playground. Guild-level quota defaults apply through it. `channel_id` may be None."""

    platform: str
    guild_id: str | None = None
    channel_id: str | None = None


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobParams:
    """The resolved generation parameters of a job (after flags, options and config defaults).

    `seeds[i]` is the seed of image i (`seed + i`). `width`/`height` are multiples of 8.
    `strength` applies to image-to-image and inpainting only. `task` is what the backend is asked
    for (txt2img, img2img, inpaint); `detail` names the operation's variant where it has one ("2x"
    for a zoom out, "left" for a pan, "subtle" / "strong" for a variation); `model` is the server
    model asked for, when not the default (`--model`, a guild's default model, an upscaler);
    `loras` the LoRAs applied (`--lora`). Follow-ups keep their parent's model and LoRAs.
    """

    width: int
    height: int
    steps: int
    guidance: float
    n: int
    seed: int
    seeds: tuple[int, ...]
    strength: float | None = None
    aspect_ratio: str | None = None  # as given with --ar, e.g. "3:2"
    task: str = "txt2img"
    detail: str | None = None
    model: str | None = None
    loras: tuple[LoraSpec, ...] = ()


@dataclass(frozen=True)
class ImageInfo:
    """One stored result image. `storage_key` is its sha256 hex (content-addressed storage); read the
    bytes with `ImageService.image_bytes(storage_key)`."""

    index: int
    seed: int
    storage_key: str
    sha256: str
    size_bytes: int
    width: int
    height: int


@dataclass(frozen=True)
class ResultImage:
    """What `Delivery.on_succeeded` receives: the stored image and its PNG bytes."""

    info: ImageInfo
    png: bytes

    @property
    def index(self) -> int:
        return self.info.index

    @property
    def seed(self) -> int:
        return self.info.seed


@dataclass(frozen=True)
class JobView:
    """A snapshot of a job row. Immutable; re-read it with `ImageService.get_job` for fresh state.

    `created` is False when the call returned an already existing job for the same idempotency key.
    `position` is not filled in by the core (None): a view is a snapshot of the row, and the place
    in the queue moves; adapters ask `ImageService.queue_position` or hear `on_queued`.
    `delivery` is the adapter's own mapping given at submit time (interaction token, channel id...).
    `result_message_id` is the platform message showing the result (see `attach_result_message`).
    """

    id: int
    kind: JobKind
    state: JobState
    platform: str
    user_id: str  # the platform user id of the requester
    display_name: str
    guild_id: str | None
    channel_id: str | None
    prompt: str
    negative_prompt: str
    params: JobParams
    parent_id: int | None
    parent_image_index: int | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result_message_id: str | None
    delivery: Mapping[str, Any]
    images: tuple[ImageInfo, ...] = ()
    attempts: int = 0
    created: bool = True
    position: int | None = None
    # Which attempt at delivering the result this is (1 = the first). The dispatcher records each
    # attempt before calling `on_succeeded` / `on_failed`, so 2 or more means an earlier attempt may
    # have posted the result and then died before it was recorded: look for that post before posting
    # again. 0 outside those two callbacks.
    delivery_attempt: int = 0
    # Submitted where private mode is on: show the result to the requester only (Discord: ephemeral
    # follow-ups; Slack: ephemeral notices and the images in a DM), never in the channel.
    private: bool = False

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class QuotaView:
    """A user's quota right now. `limit_source` says where `daily_limit` comes from: "user" (a per-
    user override),
    "role" (the highest limit of the user's roles), "guild" (the guild/workspace default) or
    "global" (`[quotas] daily_limit`).
    `remaining` = what can still be generated now = remaining_today + bonus_credits."""

    platform: str
    user_id: str
    daily_limit: int
    limit_source: LimitSource
    used_today: int
    remaining_today: int
    bonus_credits: int
    remaining: int
    reset_at: datetime
    banned: bool = False


@dataclass(frozen=True)
class UserStat:
    platform: str
    user_id: str
    display_name: str
    images: int


@dataclass(frozen=True)
class StatsView:
    """`ImageService.stats`: jobs per state (all time), images generated today (UTC period), the top
    users by images today, and the current queue depth. Scoped to the actor's platform and, when the
    place has one, to its guild/workspace."""

    jobs_by_state: Mapping[str, int]
    images_today: int
    top_users: tuple[UserStat, ...]
    queue_depth: int
    period_start: datetime


@dataclass(frozen=True)
class AuditEntry:
    id: int
    created_at: datetime
    actor_platform: str
    actor_user_id: str
    action: str
    target: str
    details: Mapping[str, Any]


@dataclass(frozen=True)
class ModelEntry:
    """A model users may pick in a place (`--model name`), with the LoRAs allowed with it there."""

    name: str
    label: str  # the family's name for people: "SDXL", "FLUX.1-schnell"
    family: str
    loras: tuple[str, ...]
    default: bool  # what jobs here get when they name no model
    loaded: bool  # in memory on a server now (others load on first use, which takes longer)


@dataclass(frozen=True)
class ModelListing:
    """What `models(place)` answers: the models allowed in the place, the default first. `choice` is
    False when the servers offer no choice of model (one model, no LoRAs); `restricted` when the
    guild's/workspace's admins allow only some of what the servers offer."""

    models: tuple[ModelEntry, ...]
    choice: bool
    restricted: bool = False

    @property
    def default(self) -> ModelEntry | None:
        return next((m for m in self.models if m.default), None)


@dataclass(frozen=True)
class ChannelDefaults:
    """What a channel's jobs get when their prompt's flags and the command's options don't say:
    a model, an aspect ratio (`--ar`), a number of steps. None: the guild's / servers' default."""

    model: str | None = None
    aspect_ratio: str | None = None
    steps: int | None = None

    @property
    def empty(self) -> bool:
        return self.model is None and self.aspect_ratio is None and self.steps is None


@dataclass(frozen=True)
class PlaceRules:
    """What applies to jobs in one place (`ImageService.place_rules`, anyone may ask): whether image
    commands are allowed in its channel (`allowed_channels` empty: everywhere), whether results are
    private there, and the channel's defaults."""

    allowed: bool = True
    allowed_channels: tuple[str, ...] = ()
    private: bool = False
    defaults: ChannelDefaults = ChannelDefaults()


@dataclass(frozen=True)
class PlaceSettings:
    """Every setting of a guild/workspace, for an admin's listing: the channels image commands are
    allowed in (empty: all), private mode for the whole guild and per channel (a channel's own
    setting wins), channel defaults, and daily limits per role (role id -> limit)."""

    guild_id: str
    allowed_channels: tuple[str, ...]
    private_guild: bool
    private_channels: Mapping[str, bool]
    defaults: Mapping[str, ChannelDefaults]
    role_limits: Mapping[str, int]


# --------------------------------------------------------------------------------------------------
# Errors (the user-facing `.message` is short and safe to show)
# --------------------------------------------------------------------------------------------------


class CoreError(Exception):
    """Base of every refusal the core returns to an adapter. `.code` is stable (for logs, metrics and
    HTTP mapping); `.message` is a short sentence for the user."""

    code = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadParameters(CoreError):
    """A flag, option or upload is invalid; `.field` names it ("steps", "ar", "image", ...) and
    `.value` is the offending value as given (may be None)."""

    code = "bad_parameters"

    def __init__(self, field: str, message: str, value: Any = None):
        super().__init__(message)
        self.field = field
        self.value = value


class QuotaExceeded(CoreError):
    """Not enough daily quota nor bonus credits. `.reset_at` (UTC, aware) is when the period resets;
    `.requested`/`.remaining` are image counts."""

    code = "quota_exceeded"

    def __init__(self, reset_at: datetime, requested: int, remaining: int, daily_limit: int):
        when = reset_at.strftime("%Y-%m-%d %H:%M UTC")
        super().__init__(
            f"Daily limit reached: you asked for {requested} image(s) and have {remaining} left "
            f"(limit {daily_limit} per day). It resets at {when}."
        )
        self.reset_at = reset_at
        self.requested = requested
        self.remaining = remaining
        self.daily_limit = daily_limit


class Moderated(CoreError):
    """The prompt matched a moderation rule; `.rule` names it (e.g. "banned term 'gore'")."""

    code = "moderated"

    def __init__(self, rule: str):
        super().__init__(f"This prompt was refused by the moderation rule: {rule}.")
        self.rule = rule


class Banned(CoreError):
    code = "banned"

    def __init__(self, reason: str = ""):
        msg = "You are banned from generating images here."
        if reason:
            msg += f" Reason: {reason}"
        super().__init__(msg)
        self.reason = reason


class NotAdmin(CoreError):
    code = "not_admin"

    def __init__(self, operation: str):
        super().__init__(f"Only admins can use {operation}.")
        self.operation = operation


class NotAllowedHere(CoreError):
    """Image commands are not allowed in this channel; `.channels` are the ones they are allowed in
    (the message names them as `<#id>`, which Discord and Slack both show as channel links)."""

    code = "not_allowed_here"

    def __init__(self, channels: Sequence[str]):
        where = ", ".join(f"<#{c}>" for c in channels)
        super().__init__(f"Image commands are not allowed in this channel. Use them in {where}.")
        self.channels = tuple(channels)


class Overloaded(CoreError):
    """Too many queued jobs; try again later. `.retry_after_s` is a hint."""

    code = "overloaded"

    def __init__(
        self,
        message: str = "The queue is full right now, please try again in a minute.",
        retry_after_s: float = 60.0,
    ):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotFound(CoreError):
    """No such job / message / image (e.g. re-roll on a message that is not a result)."""

    code = "not_found"


class BackendUnavailable(CoreError):
    """The image backend cannot be reached. The dispatcher retries queued jobs itself; this is raised
    only by calls that need the backend synchronously."""

    code = "backend_unavailable"


class ServiceError(CoreError):
    """Our side failed (the database, the image storage), not the request. The core logs the cause
    with its traceback where it happens; `.message` says what failed, without internals."""

    code = "service_error"


class DatabaseError(ServiceError):
    """A database call failed. `.kind`: "unavailable" (connection lost or refused, pool timeout: worth
    retrying in a moment), "conflict" (a unique constraint: another request won a race) or "error"."""

    code = "database_error"

    def __init__(self, message: str, kind: Literal["unavailable", "conflict", "error"] = "error"):
        super().__init__(message)
        self.kind = kind


class StorageError(ServiceError):
    """The image storage could not read or write (disk full, not writable, gone)."""

    code = "storage_error"


# --------------------------------------------------------------------------------------------------
# Delivery (implemented by each adapter, registered per platform)
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class Delivery(Protocol):
    """How the core reports a job's progress and result to the adapter of the job's platform.

    Called by the dispatcher task of the process that claimed the job (maybe a different process,
    or the same process after a restart, than the one that accepted the command: use `job.delivery`,
    never in-memory state, to find where to post). Exceptions are logged and ignored.
    """

    async def on_queued(self, job: JobView, position: int) -> None:
        """The job waits; `position` is 1-based (1 = starts next). Called when it changes."""
        ...

    async def on_progress(self, job: JobView, step: int, total: int) -> None:
        """The job runs: step 0 when it starts, then throttled to `[bot] progress_interval_s`."""
        ...

    async def on_waiting(self, job: JobView, message: str) -> None:
        """The job waits for an image server to come back (none is reachable); `message` is short,
        user-safe and says so. Then progress, a result or a failure follows as usual."""
        ...

    async def on_succeeded(self, job: JobView, images: Sequence[ResultImage]) -> None:
        """Post the images, then call `ImageService.attach_result_message(job.id, message_id)`."""
        ...

    async def on_failed(self, job: JobView, message: str) -> None:
        """The job failed for good (quota already refunded); `message` is short and user-safe."""
        ...


@runtime_checkable
class PreviewDelivery(Protocol):
    """Optional for a `Delivery`: an adapter that implements it also gets live previews."""

    async def on_preview(self, job: JobView, step: int, total: int, png: bytes) -> None:
        """A small PNG of the first image as it forms after `step` of `total`, at most once per
        `[bot] preview_interval_s` per job; never after `on_succeeded`."""
        ...


# Emoji (and Slack reaction names) understood by `ImageService.react`, which also accepts
# ":name:" and emoji with or without the U+FE0F variation selector.
# Value: ("reroll", None) or ("variation", image index 0-3).
REACTION_ACTIONS: Mapping[str, tuple[str, int | None]] = {
    "\U0001f501": ("reroll", None),  # 🔁
    "repeat": ("reroll", None),
    "1\ufe0f\u20e3": ("variation", 0),
    "one": ("variation", 0),
    "2\ufe0f\u20e3": ("variation", 1),
    "two": ("variation", 1),
    "3\ufe0f\u20e3": ("variation", 2),
    "three": ("variation", 2),
    "4\ufe0f\u20e3": ("variation", 3),
    "four": ("variation", 3),
    "\U0001f3a8": ("variation", 0),  # 🎨: a variation of the first image
    "art": ("variation", 0),
}


# --------------------------------------------------------------------------------------------------
# The facade
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class ImageService(Protocol):
    """What adapters call. The implementation is `bot.core.service.CoreService`, built and started by
    `bot.bootstrap.build_core`. All methods are coroutines and safe to call concurrently.

    Common rules:
    - `idempotency_key` is the platform's interaction / event id (unique per platform); the core
      namespaces it by platform. Same key again -> the existing job, `created=False`, no new charge.
    - `delivery` is a JSON-serialisable mapping the adapter will need in its `Delivery` callbacks.
    - Submissions raise (checked in this order): BadParameters, Banned, Moderated, Overloaded,
      QuotaExceeded. The quota is reserved in the same transaction that creates the job row.
    - Admin operations raise NotAdmin unless `actor.is_admin`; each one (and each refusal) is
      written to the audit log. Targets are user ids on the actor's platform.
    """

    # -- wiring ---------------------------------------------------------------------------------
    def register_delivery(self, platform: str, delivery: Delivery) -> None:
        """Register the adapter's delivery for `platform`; from now on this process dispatches that
        platform's jobs (including ones left queued/running by a previous run)."""
        ...

    def unregister_delivery(self, platform: str) -> None: ...

    async def claim_publication(self, key: str, digest: str) -> bool:
        """True for exactly one caller (of all processes) per new `digest` of `key`: that caller
        publishes it (e.g. syncs Discord's command tree whose hash is `digest`). False when `digest`
        is what was published last. A publisher that fails calls `publication_failed`."""
        ...

    async def publication_failed(self, key: str, digest: str) -> None:
        """Forget a claimed `digest` that could not be published, so the next claim wins again."""
        ...

    # -- submitting -----------------------------------------------------------------------------
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
        """Text to image. `text` is the prompt and may carry flags (`--seed N --steps N --n N
        --ar W:H --guidance G --no NEGATIVE`, see `bot.core.params`). `options` (slash-command
        options: seed, steps, n, ar, guidance, negative) override flags; None values are ignored."""
        ...

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
        """Repaint part of `image` (PNG/JPEG/WebP bytes). `mask`: white = repaint, black = keep, same
        size as the image. Without a mask, the image's transparent pixels are the area to repaint
        (BadParameters(field="mask") if it has none). Size follows the image's aspect ratio."""
        ...

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
        """A reaction on a message. Returns None (ignore silently) when `emoji` is not one of
        `REACTION_ACTIONS` or `message_id` is not a result message on this platform; otherwise
        submits a re-roll or variation (which may raise like any submission)."""
        ...

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
        """Same prompt and parameters as the parent job (given by id or result message id), new seed.
        NotFound if the parent does not exist or the actor may not use it: it must be on the actor's
        platform; by result message, anyone in the channel that shows the result may use it (a
        result shown in no channel is its owner's); by job id, its owner or an admin acting in its
        guild/workspace. BadParameters if it has not succeeded."""
        ...

    async def variation(
        self,
        actor: Actor,
        place: Place,
        index: int,
        *,
        job_id: int | None = None,
        message_id: str | None = None,
        subtle: bool = False,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        """Image-to-image from image `index` (0-based) of the parent job, same prompt, new seed, at
        `[bot] variation_strength` (V1-V4, Vary (Strong)) or, `subtle`, `subtle_variation_strength`.
        The parent is found and checked as for `reroll`; a button gives both the job id and the
        message it sits on (the message decides who may use it, the id covers a result whose
        message was never recorded)."""
        ...

    async def image_to_image(
        self,
        actor: Actor,
        place: Place,
        text: str,
        image: bytes,
        options: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        """/imagine starting from `image` (PNG/JPEG/WebP bytes, at most `[bot] max_upload_bytes`):
        image-to-image at `--strength` (default `[bot] image_strength`); the size follows the image's
        aspect ratio (--ar is refused). A job of kind "imagine" whose task is img2img."""
        ...

    async def upscale(
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
        """Image `index` at twice its size (a hires fix: resized 2x, then image-to-image at
        `[bot] upscale_strength`, in tiles past `[bot] max_side`); one image."""
        ...

    async def zoom_out(
        self,
        actor: Actor,
        place: Place,
        factor: float,
        *,
        index: int = 0,
        job_id: int | None = None,
        message_id: str | None = None,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        """Image `index` centred on a canvas 1.5x or 2x its size (scaled to `[bot] max_side`), the
        border inpainted."""
        ...

    async def pan(
        self,
        actor: Actor,
        place: Place,
        direction: str,
        *,
        index: int = 0,
        job_id: int | None = None,
        message_id: str | None = None,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        """Image `index` extended by half its side to the left, right, up or down, inpainted."""
        ...

    async def remix(
        self,
        actor: Actor,
        place: Place,
        text: str,
        *,
        index: int = 0,
        job_id: int | None = None,
        message_id: str | None = None,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        """A variation of image `index` with an edited prompt and flags (`text`; start the edit
        from `bot.core.operations.remix_text(parent)`); `--strength` allowed, `--ar` refused."""
        ...

    async def cancel(self, actor: Actor, job_id: int, place: Place | None = None) -> JobView:
        """Cancel a queued or running job (own job, or for admins any job of the guild/workspace of
        `place`); quota is refunded and a running job's dispatcher stops it (its result, should it
        come, is discarded). A finished job is returned unchanged. NotFound for a job on
        another platform or, for an admin, in another guild."""
        ...

    # -- reading --------------------------------------------------------------------------------
    async def attach_result_message(
        self, job_id: int, message_id: str, channel_id: str | None = None
    ) -> None:
        """Record the platform message that shows the job's result (reactions/buttons resolve
        through it). Idempotent."""
        ...

    async def record_shown(self, job_id: int) -> None:
        """The result is shown but its message id is not known yet (Slack shares uploads
        asynchronously): the job counts as delivered, so a restart does not post it again.
        `attach_result_message` adds the id later. NotFound if missing."""
        ...

    async def unattached_results(
        self, platform: str, channel_id: str, *, within_s: float = 86_400.0, limit: int = 10
    ) -> list[JobView]:
        """Delivered results in `channel_id` (of the last day) whose message id was never recorded,
        newest first: where an adapter looks for the job of a message it does not know."""
        ...

    async def remember_delivery(self, job_id: int, values: Mapping[str, str]) -> None:
        """Merge `values` into the job's `delivery` mapping (e.g. the id of a status message posted
        after submit), so that whoever delivers the job after a restart finds them. NotFound if
        missing."""
        ...

    async def get_job(self, job_id: int) -> JobView:
        """NotFound if missing."""
        ...

    async def job_for_message(self, platform: str, message_id: str) -> JobView | None: ...

    async def queue_position(self, job_id: int) -> int | None:
        """The job's place in the queue now (1 = starts next), or None when it is not queued or is
        far back (past 50): for the first status message; changes come through `on_queued`."""
        ...

    async def wait_for_job(self, job_id: int, timeout_s: float | None = None) -> JobView:
        """Wait until the job is done (succeeded/failed/cancelled) and return it; TimeoutError after
        `timeout_s`. For the playground and tests; chat adapters use `Delivery` instead."""
        ...

    async def image_bytes(self, storage_key: str) -> bytes:
        """The PNG bytes of a stored image; NotFound if missing."""
        ...

    async def history(self, actor: Actor, limit: int = 10) -> list[JobView]:
        """The actor's most recent jobs, newest first (limit capped at 100)."""
        ...

    async def quota(self, actor: Actor, place: Place) -> QuotaView:
        """The actor's own usage and limits in `place`."""
        ...

    # -- admin (refused with NotAdmin unless actor.is_admin) --------------------------------------
    async def usage(self, actor: Actor, place: Place, target_user_id: str) -> QuotaView:
        """Usage and limits of another user on the actor's platform, in `place`."""
        ...

    async def set_user_limit(self, actor: Actor, target_user_id: str, daily_limit: int | None) -> QuotaView:
        """Per-user daily limit override (0 blocks; None removes the override)."""
        ...

    async def set_guild_limit(self, actor: Actor, guild_id: str, daily_limit: int | None) -> None:
        """Default daily limit for users of a guild/workspace (None removes it)."""
        ...

    async def grant_credits(self, actor: Actor, target_user_id: str, amount: int) -> QuotaView:
        """Add bonus credits (images usable after the daily limit). `amount` from 1 to 10000."""
        ...

    async def reset_usage(self, actor: Actor, target_user_id: str) -> QuotaView:
        """Set the user's images used in the current period to 0."""
        ...

    async def ban(self, actor: Actor, target_user_id: str, reason: str = "") -> None: ...

    async def unban(self, actor: Actor, target_user_id: str) -> None: ...

    async def stats(self, actor: Actor, place: Place, top: int = 5) -> StatsView: ...

    async def audit_log(self, actor: Actor, limit: int = 20) -> list[AuditEntry]:
        """The latest audit entries on the actor's platform, newest first."""
        ...

    # -- models and LoRAs -----------------------------------------------------------------------
    async def models(self, place: Place) -> ModelListing:
        """The models and LoRAs users may pick in `place` (anyone may ask; for listings and
        autocomplete)."""
        ...

    async def set_default_model(self, actor: Actor, place: Place, model: str | None) -> ModelListing:
        """Admin: the model jobs in the place's guild/workspace get when they name none (None: the
        servers' default)."""
        ...

    async def allow_models(self, actor: Actor, place: Place, models: Sequence[str]) -> ModelListing:
        """Admin: the models allowed in the place's guild/workspace (empty: all)."""
        ...

    async def allow_loras(self, actor: Actor, place: Place, loras: Sequence[str]) -> ModelListing:
        """Admin: the LoRAs allowed in the place's guild/workspace (empty: all)."""
        ...

    # -- channel and role settings (bot.core.place_settings) -----------------------------------
    async def place_rules(self, place: Place) -> PlaceRules:
        """What applies in `place` (allowed here, private mode, channel defaults): anyone may ask;
        adapters read it before answering a command to know whether to answer privately."""
        ...

    async def place_settings(self, actor: Actor, place: Place) -> PlaceSettings:
        """Admin: every setting of the place's guild/workspace."""
        ...

    async def allow_channels(self, actor: Actor, place: Place, channel_ids: Sequence[str]) -> PlaceSettings:
        """Admin: image commands only in these channels of the guild (empty: everywhere)."""
        ...

    async def set_channel_defaults(
        self, actor: Actor, place: Place, channel_id: str, defaults: ChannelDefaults
    ) -> PlaceSettings:
        """Admin: a channel's defaults (model, aspect ratio, steps); all None removes them."""
        ...

    async def set_private(
        self, actor: Actor, place: Place, channel_id: str | None, private: bool | None
    ) -> PlaceSettings:
        """Admin: private mode for a channel (None: for the whole guild); `private` None removes a
        channel's own setting (the guild's applies)."""
        ...

    async def set_role_limit(
        self, actor: Actor, place: Place, role_id: str, daily_limit: int | None
    ) -> PlaceSettings:
        """Admin: the daily limit of a role in the guild (None removes it). A user gets the highest
        limit of their roles; a per-user limit wins over it."""
        ...
