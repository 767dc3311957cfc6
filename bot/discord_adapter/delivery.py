"""Core -> Discord: queue position, progress edits and the result message for each job.

One message per job: its status (queue position, progress, with a Cancel button) is edited into the
result (the images, with the buttons of `bot.core.controls`) or the failure. Nothing is added to it
afterwards: no hint reactions (reactions still work, the buttons say what is possible), so a result
costs one request against Discord's rate limits and its dispatch slot is free before it is posted.

Everything comes from `job.delivery` (written when the job was submitted), never from live
`Interaction` objects, so a job accepted before a restart is delivered by the restarted bot. The
only in-memory state is a throttle clock (with the latest update parked until the interval is
over) and, for channel-mode jobs, the id of the status message to edit, which is also kept in the
job's delivery mapping (`status_message_id`) so that a restarted bot edits the same message (the
status message is sent with a nonce too, so a send cut off by a stop before its id was kept is not
posted a second time by the next start, within Discord's nonce window). A status message the user
deleted ends the status updates quietly; the result goes to the channel.

A result survives Discord outages: posting is retried with backoff while Discord answers 5xx or
cannot be reached, through the interaction while its token lasts and then as a channel message; a
restart meanwhile leaves the job undelivered for the next process. Only the requester is pinged.

A result is posted once, even when the bot dies between posting it and recording it (the core
counts delivery attempts before calling us: `job.delivery_attempt`). From the second attempt on we
look for the earlier post before posting: the interaction's original response, the status message,
and the channel's history since the job was made (a bot message carrying `imagine-<job id>.*`).
Channel messages are sent with a nonce made from the job id and `enforce_nonce`, so Discord itself
answers a repeated send with the message it already has, for a few minutes.

Private mode (`job.private`, decided by the core for the job's place): the command was deferred
ephemerally, so editing the interaction's original response shows the status and the result to the
requester only; nothing is ever sent to the channel. A private job that finishes after the
interaction token's 15 minutes is not shown (logged), rather than shown publicly.

What remains: a channel-mode result (one sent with the bot token: a reaction's job, or a token near
its 15-minute end) whose post reached Discord just before the bot died, when the restart comes later
than Discord's nonce window (a few minutes) and the bot cannot read the channel's history (no Read
Message History permission) or the post lies more than `HISTORY_SCAN` messages after the job's
start. Failure notices (text only) rely on the nonce alone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
import discord

from bot.core.api import JobView, ResultImage
from bot.discord_adapter import messages
from bot.discord_adapter.config import INTERACTION_TOKEN_TTL_S, DiscordConfig
from bot.discord_adapter.controls import result_view, status_view
from bot.discord_adapter.images import fit_to_limit, grid

if TYPE_CHECKING:
    from bot.discord_adapter.bot import ImagineBot

log = logging.getLogger(__name__)

# Messages of the channel's history read, after the job's start, looking for a result posted by a
# delivery attempt that died before recording it: two pages of Discord's 100, a busy channel's
# traffic during a restart.
HISTORY_SCAN = 200

# Backoff between attempts at posting a result while Discord answers 5xx or cannot be reached: the
# first retry soon (a blip), then doubling up to a minute (an outage), until the post goes through.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0


# The message id of an interaction's first response, in webhook routes. discord.py types message
# ids as int, hence the `type: ignore`s where it is passed.
ORIGINAL = "@original"
PREVIEW_FILENAME = "preview.png"

# Status phases only move forward: a late "queued" report never hides "generating".
QUEUED, RUNNING = 0, 1


class PrivateExpired(Exception):
    """A private job's result can't be shown privately any more (its interaction token expired or
    its response is gone); it is not posted in the channel."""


def result_filename_prefix(job_id: int) -> str:
    """Every result file of a job is named `imagine-<job id>.<ext>`: how a later attempt finds it."""
    return f"imagine-{job_id}."


def job_nonce(job_id: int) -> str:
    """The nonce of a job's final channel message (Discord allows 25 characters)."""
    return f"imagine-{job_id}"


def status_nonce(job_id: int) -> str:
    """The nonce of a job's channel status message: a send cut off after Discord made the message
    but before its id was kept (a stop cancels the job mid-send) is answered with that message when
    the next start sends the status again, instead of leaving it behind as a second one."""
    return f"status-{job_id}"


def _render(pngs: list[bytes], limit: int) -> tuple[bytes, bytes, str]:
    sheet = grid(pngs)
    data, ext = fit_to_limit(sheet, limit)
    return sheet, data, ext


class DiscordDelivery:
    def __init__(self, bot: ImagineBot, config: DiscordConfig):
        self.bot = bot
        self.config = config
        self._last_edit: dict[int, float] = {}
        self._shown: dict[int, str] = {}  # job id -> status text last shown (no edit to the same)
        # A throttled update (status text, phase, preview PNG or None), shown later.
        self._parked: dict[int, tuple[JobView, str, int, bytes | None]] = {}
        self._previewed: set[int] = set()  # jobs whose status message carries a preview image
        self._flushers: dict[int, asyncio.Task[None]] = {}
        self._status: dict[int, int] = {}  # job id -> channel status message id (channel mode)
        self._phase: dict[int, int] = {}  # job id -> QUEUED / RUNNING as last shown
        self._gone: set[int] = set()  # jobs whose status message was deleted: no more status
        self._locks: dict[int, asyncio.Lock] = {}
        # Jobs already answered, so a late progress callback never overwrites a result. Bounded:
        # a progress callback arrives seconds after the result at most, never thousands of jobs later.
        self._finished: OrderedDict[int, None] = OrderedDict()

    # -- Delivery protocol ------------------------------------------------------------------------

    async def on_queued(self, job: JobView, position: int | None) -> None:
        await self._status_update(job, messages.queued(job, position), QUEUED)

    async def show_first_status(self, job: JobView, position: int | None) -> None:
        """The status shown right after a submission, with the position the adapter read itself;
        not shown when a status of the job was written or parked already. That one came from the
        core, whose report is no older than our read (or differs from it only when the queue moved
        in between, and then the core reports the change next), and our read must not replace it:
        the core reports a position again only when it changes."""
        if job.id in self._last_edit or job.id in self._parked:
            return
        await self.on_queued(job, position)

    async def on_progress(self, job: JobView, step: int, total: int) -> None:
        await self._status_update(job, messages.progress(job, step, total), RUNNING)

    async def on_waiting(self, job: JobView, message: str) -> None:
        await self._status_update(job, messages.waiting(job, message), RUNNING)

    async def on_preview(self, job: JobView, step: int, total: int, png: bytes) -> None:
        """The status message shows the image forming: the progress line with the preview attached,
        through the same throttled status edit (a newer preview replaces a parked one)."""
        await self._status_update(job, messages.progress(job, step, total), RUNNING, png)

    async def on_succeeded(self, job: JobView, images: Sequence[ResultImage]) -> None:
        images = sorted(images, key=lambda i: i.index)
        async with self._lock(job.id):
            if job.id in self._finished:
                return
            if job.delivery_attempt > 1:
                posted = await self._find_posted_result(job)
                if posted is not None:
                    log.info("job %s: result already posted as message %s; recording it", job.id, posted.id)
                    self.finished(job.id)
                    await self.bot.service.attach_result_message(
                        job.id, str(posted.id), str(posted.channel.id)
                    )
                    return
            limit = self._upload_limit(job)
            # Image work in a thread: a 2x2 grid of 1024px images takes long enough to starve the
            # gateway heartbeat if done on the event loop.
            sheet, data, ext = await asyncio.to_thread(_render, [img.png for img in images], limit)
            if data is not sheet:
                log.info(
                    "job %s: result re-encoded from %d to %d bytes (limit %d)",
                    job.id,
                    len(sheet),
                    len(data),
                    limit,
                )
            upload = (f"{result_filename_prefix(job.id)}{ext}", data)
            try:
                message = await self._post_until_delivered(
                    job, messages.caption(job), upload, result_view(job)
                )
            except PrivateExpired:
                self._private_expired(job)
                return
            # Shown: from here on a failure must not post the result a second time.
            self.finished(job.id)
            await self.bot.service.attach_result_message(job.id, str(message.id), str(message.channel.id))

    async def on_failed(self, job: JobView, message: str) -> None:
        async with self._lock(job.id):
            if job.id in self._finished:
                return
            try:
                await self._post_until_delivered(job, messages.failed(job, message), None, None)
            except PrivateExpired:
                self._private_expired(job)
                return
            self.finished(job.id)

    def _private_expired(self, job: JobView) -> None:
        # Its place is in private mode: the channel must not see it, and no other private way to
        # the user is left (a DM would need the user to accept DMs from the server's members).
        log.warning(
            "job %s: private result not shown: the interaction token expired before it finished", job.id
        )
        self.finished(job.id)

    def finished(self, job_id: int) -> None:
        """The job is answered (its result, failure or cancellation is shown): no status after it."""
        self._finished[job_id] = None
        while len(self._finished) > 10_000:
            self._finished.popitem(last=False)
        self._last_edit.pop(job_id, None)
        self._shown.pop(job_id, None)
        self._parked.pop(job_id, None)
        self._previewed.discard(job_id)
        flusher = self._flushers.pop(job_id, None)
        if flusher is not None and flusher is not asyncio.current_task():
            flusher.cancel()
        self._status.pop(job_id, None)
        self._phase.pop(job_id, None)
        self._gone.discard(job_id)
        self._locks.pop(job_id, None)

    async def close(self) -> None:
        """Cancel parked status updates (at shutdown)."""
        tasks = list(self._flushers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals --------------------------------------------------------------------------------

    async def _find_posted_result(self, job: JobView) -> discord.Message | None:
        """The result message an earlier, unfinished delivery attempt posted, if Discord can tell:
        the interaction's original response, the status message, then the channel's history."""
        prefix = result_filename_prefix(job.id)
        me = self.bot.user

        def is_result(m: discord.Message) -> bool:
            return any(a.filename.startswith(prefix) for a in m.attachments)

        async def original() -> discord.Message | None:
            if not self._token_usable(job):
                return None
            message = await self._webhook(job).fetch_message(ORIGINAL)  # type: ignore[arg-type]
            return message if is_result(message) else None

        async def status() -> discord.Message | None:
            status_id = self._status_id(job)
            if status_id is None:
                return None
            message = await self._channel(job).fetch_message(status_id)
            return message if is_result(message) else None

        async def history() -> discord.Message | None:
            since = discord.utils.time_snowflake(job.created_at - dt.timedelta(seconds=1))
            async for message in self._channel(job).history(limit=HISTORY_SCAN, after=discord.Object(since)):
                if me is not None and message.author.id == me.id and is_result(message):
                    return message
            return None

        for where, look in (
            ("original response", original),
            ("status message", status),
            ("history", history),
        ):
            try:
                found = await look()
            except discord.HTTPException as e:
                # Forbidden (no Read Message History), a deleted message: the next place, and in the
                # end the nonce on the send, are what is left.
                log.info("job %s: could not look in the %s (%s %s)", job.id, where, e.status, e.text)
                continue
            if found is not None:
                return found
        return None

    def _status_id(self, job: JobView) -> int | None:
        status = self._status.get(job.id) or job.delivery.get("status_message_id")
        return int(status) if status else None

    def _lock(self, job_id: int) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    def _token_usable(self, job: JobView) -> bool:
        d = job.delivery
        if d.get("mode") != "interaction":
            return False
        age = time.time() - discord.utils.snowflake_time(int(d["interaction_id"])).timestamp()
        return age < INTERACTION_TOKEN_TTL_S - self.config.token_margin_s

    def _webhook(self, job: JobView) -> discord.Webhook:
        d = job.delivery
        return discord.Webhook.partial(int(d["application_id"]), d["token"], client=self.bot)

    def _channel(self, job: JobView) -> discord.PartialMessageable:
        channel_id = job.delivery.get("channel_id") or job.channel_id
        if channel_id is None:
            raise ValueError(f"job {job.id} has no channel to deliver to")
        guild_id = job.delivery.get("guild_id") or job.guild_id
        return self.bot.get_partial_messageable(int(channel_id), guild_id=int(guild_id) if guild_id else None)

    def _upload_limit(self, job: JobView) -> int:
        if self._token_usable(job) and job.delivery.get("size_limit"):
            return int(job.delivery["size_limit"])
        guild = self.bot.get_guild(int(job.guild_id)) if job.guild_id else None
        return guild.filesize_limit if guild else discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES

    async def _status_update(self, job: JobView, text: str, phase: int, preview: bytes | None = None) -> None:
        """Show `text` as the job's status (queue position, progress), at most one edit per
        `progress_edit_interval_s`: an update that comes sooner is parked and shown when the
        interval is over (the latest one wins), so the message never lags behind for long."""
        if job.id in self._finished or job.id in self._gone or self._phase.get(job.id, QUEUED) > phase:
            return
        last = self._last_edit.get(job.id)
        wait = 0.0 if last is None else last + self.config.progress_edit_interval_s - time.monotonic()
        if wait > 0:
            parked = self._parked.get(job.id)
            if preview is None and parked is not None and parked[3] is not None:
                preview = parked[3]  # a text-only update keeps the parked picture
            self._parked[job.id] = (job, text, phase, preview)
            if job.id not in self._flushers:
                self._flushers[job.id] = asyncio.create_task(
                    self._flush_later(job.id, wait), name=f"discord status {job.id}"
                )
            return
        await self._write_status(job, text, phase, preview)

    async def _flush_later(self, job_id: int, wait: float) -> None:
        try:
            await asyncio.sleep(wait)
            parked = self._parked.pop(job_id, None)
            self._flushers.pop(job_id, None)
            if parked is not None:
                await self._write_status(*parked)
        except asyncio.CancelledError:
            raise
        except Exception:  # a status line is not worth a traceback per job; the result still comes
            log.warning("job %s: a parked status update failed", job_id, exc_info=True)
        finally:
            if self._flushers.get(job_id) is asyncio.current_task():
                self._flushers.pop(job_id, None)

    async def _write_status(self, job: JobView, text: str, phase: int, preview: bytes | None = None) -> None:
        self._last_edit[job.id] = time.monotonic()
        self._parked.pop(job.id, None)
        async with self._lock(job.id):
            if job.id in self._finished or job.id in self._gone or self._phase.get(job.id, QUEUED) > phase:
                return
            if self._shown.get(job.id) == text and preview is None:
                return
            self._phase[job.id] = phase
            kwargs: dict[str, Any] = {
                "content": text,
                "view": status_view(job),
                "allowed_mentions": self._mentions(job),
            }
            if preview is not None:
                # Only the interaction's own message is edited with previews: a channel status
                # message shares the channel's edit budget with every other job's.
                if not self._token_usable(job):
                    return
                kwargs["attachments"] = [discord.File(io.BytesIO(preview), filename=PREVIEW_FILENAME)]
                self._previewed.add(job.id)
            try:
                if self._token_usable(job):
                    await self._webhook(job).edit_message(ORIGINAL, **kwargs)  # type: ignore[call-overload]
                elif (
                    job.delivery.get("mode") == "channel" and self._status_id(job) is None and not job.private
                ):
                    # One status message, edited only into the result: channel messages share
                    # Discord's per-channel limit (5 per 5 s) with every other job's.
                    sent = await self._send(
                        job, self._channel(job), text, view=kwargs["view"], nonce=status_nonce(job.id)
                    )
                    self._status[job.id] = sent.id
                    await self._keep_status(job, sent.id)
                # An interaction past its token: progress is not worth a channel message; the result is.
            except discord.NotFound:
                # The user deleted the status ("thinking...") message: no more status for this job;
                # the result is posted in the channel instead (see _post). Not an error.
                log.info("job %s: its status message is gone; no more progress shown for it", job.id)
                self._gone.add(job.id)
                return
            except (discord.HTTPException, aiohttp.ClientError, TimeoutError) as e:
                # Discord is failing (an outage): the next update, or the result, says it again.
                log.warning("job %s: status update failed: %s", job.id, getattr(e, "text", None) or repr(e))
                return
            self._shown[job.id] = text

    async def _keep_status(self, job: JobView, message_id: int) -> None:
        """Keep the status message's id with the job, so a restarted bot edits it instead of posting
        a second one (and finds the result in it)."""
        try:
            await self.bot.service.remember_delivery(job.id, {"status_message_id": str(message_id)})
        except Exception:  # the message is shown either way; only a restart would post another
            log.warning("job %s: could not record its status message", job.id, exc_info=True)

    def _reference(self, job: JobView) -> discord.MessageReference | None:
        parent = job.delivery.get("reply_to")
        if not parent:
            return None
        return discord.MessageReference(
            message_id=int(parent), channel_id=int(job.delivery["channel_id"]), fail_if_not_exists=False
        )

    def _mentions(self, job: JobView) -> discord.AllowedMentions:
        """Only the requester is pinged: a `<@someone>` typed into a prompt pings nobody."""
        return discord.AllowedMentions(
            everyone=False,
            roles=False,
            users=[discord.Object(int(job.user_id))] if job.user_id.isdigit() else False,
        )

    async def _post_until_delivered(
        self, job: JobView, text: str, upload: tuple[str, bytes] | None, view: discord.ui.View | None
    ) -> discord.Message:
        """`_post`, again with backoff while Discord answers 5xx or cannot be reached (discord.py
        gives up after a few tries), through the interaction while its token lasts and then as a
        channel message, until `[discord] delivery_retry_s` have passed. A restart meanwhile leaves
        the job undelivered, and the next process goes on with it."""
        give_up_at = time.monotonic() + self.config.delivery_retry_s
        delay = RETRY_FIRST_S
        while True:
            file = discord.File(io.BytesIO(upload[1]), filename=upload[0]) if upload is not None else None
            try:
                return await self._post(job, text, file, view)
            except (discord.DiscordServerError, aiohttp.ClientError, TimeoutError) as e:
                if time.monotonic() + delay > give_up_at:
                    raise
                what = f"{e.status} {e.text}" if isinstance(e, discord.DiscordServerError) else repr(e)
                log.warning(
                    "job %s: Discord failed the post (%s); trying again in %.0f s", job.id, what, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _post(
        self, job: JobView, text: str, file: discord.File | None, view: discord.ui.View | None
    ) -> discord.Message:
        """Show the final text (and file) where the user is looking, falling back to the channel."""
        kwargs: dict[str, Any] = {"content": text, "view": view, "allowed_mentions": self._mentions(job)}
        if file is not None:
            kwargs["attachments"] = [file]
        elif job.id in self._previewed:
            kwargs["attachments"] = []  # a failure message must not keep the last preview
        if job.private:
            # Private mode: only the interaction's own response (deferred ephemerally) may show it.
            if not self._token_usable(job):
                raise PrivateExpired(job.id)
            try:
                return await self._webhook(job).edit_message(ORIGINAL, **kwargs)  # type: ignore[call-overload]
            except discord.NotFound:
                raise PrivateExpired(job.id) from None
        if self._token_usable(job) and job.id not in self._gone:
            try:
                return await self._webhook(job).edit_message(ORIGINAL, **kwargs)  # type: ignore[call-overload]
            except discord.NotFound:
                log.info("job %s: the interaction response is gone; posting in the channel", job.id)
            except discord.HTTPException as e:
                if e.status not in (401, 403):
                    raise
                log.info("job %s: interaction token refused (%s); posting in the channel", job.id, e.status)
            if file is not None:
                file.reset()
        channel = self._channel(job)
        status = self._status_id(job)
        if status is not None and job.id not in self._gone:
            try:
                return await channel.get_partial_message(status).edit(**kwargs)
            except discord.NotFound:
                pass
            if file is not None:
                file.reset()
        # The job's nonce: Discord answers a repeated send (a restarted delivery) with the message
        # it already has instead of a second one, within its nonce window.
        send: dict[str, Any] = {"nonce": job_nonce(job.id), "view": view}
        if file is not None:
            send["file"] = file
        return await self._send(job, channel, text, **send)

    async def _send(
        self, job: JobView, channel: discord.PartialMessageable, text: str, **kwargs: Any
    ) -> discord.Message:
        """`channel.send`, as a reply to the job's `reply_to` message when it has one, pinging only
        the requester."""
        reference = self._reference(job)
        if reference is not None:
            kwargs["reference"] = reference
        if kwargs.get("view") is None:
            kwargs.pop("view", None)
        return await channel.send(text, allowed_mentions=self._mentions(job), **kwargs)
