"""Core -> Discord: queue position, progress edits and the result message for each job.

Everything comes from `job.delivery` (written when the job was submitted), never from live
`Interaction` objects, so a job accepted before a restart is delivered by the restarted bot. The
only in-memory state is a throttle clock and, for channel-mode jobs, the id of the status message
to edit; losing either on restart costs one extra message, not a job.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import discord

from bot.core.api import JobView, ResultImage
from bot.discord_adapter import messages
from bot.discord_adapter.config import INTERACTION_TOKEN_TTL_S, DiscordConfig
from bot.discord_adapter.images import fit_to_limit, grid

if TYPE_CHECKING:
    from bot.discord_adapter.bot import ImagineBot

log = logging.getLogger(__name__)

NUMBER_EMOJI = ("1\ufe0f\u20e3", "2\ufe0f\u20e3", "3\ufe0f\u20e3", "4\ufe0f\u20e3")
REROLL_EMOJI = "\U0001f501"
VARIATION_EMOJI = "\U0001f3a8"


# Status phases only move forward: a late "queued" report never hides "generating".
QUEUED, RUNNING = 0, 1


def result_reactions(n: int) -> list[str]:
    return [REROLL_EMOJI, *(NUMBER_EMOJI[:n] if n > 1 else [VARIATION_EMOJI])]


def _render(pngs: list[bytes], limit: int) -> tuple[bytes, bytes, str]:
    sheet = grid(pngs)
    data, ext = fit_to_limit(sheet, limit)
    return sheet, data, ext


class DiscordDelivery:
    def __init__(self, bot: ImagineBot, config: DiscordConfig):
        self.bot = bot
        self.config = config
        self._last_edit: dict[int, float] = {}
        self._status: dict[int, int] = {}  # job id -> channel status message id (channel mode)
        self._phase: dict[int, int] = {}  # job id -> QUEUED / RUNNING as last shown
        self._locks: dict[int, asyncio.Lock] = {}
        # Jobs already answered, so a late progress callback never overwrites a result. Bounded:
        # a progress callback arrives seconds after the result at most, never thousands of jobs later.
        self._finished: OrderedDict[int, None] = OrderedDict()

    # -- Delivery protocol ------------------------------------------------------------------------

    async def on_queued(self, job: JobView, position: int | None) -> None:
        await self._status_update(job, messages.queued(job, position), QUEUED)

    async def on_progress(self, job: JobView, step: int, total: int) -> None:
        await self._status_update(job, messages.progress(job, step, total), RUNNING)

    async def on_succeeded(self, job: JobView, images: Sequence[ResultImage]) -> None:
        images = sorted(images, key=lambda i: i.index)
        async with self._lock(job.id):
            if job.id in self._finished:
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
            file = discord.File(io.BytesIO(data), filename=f"imagine-{job.id}.{ext}")
            message = await self._post(job, messages.caption(job), file)
            # Shown: from here on a failure must not post the result a second time.
            self._forget(job.id)
            await self.bot.service.attach_result_message(job.id, str(message.id), str(message.channel.id))
            for emoji in result_reactions(len(images)):
                await message.add_reaction(emoji)

    async def on_failed(self, job: JobView, message: str) -> None:
        async with self._lock(job.id):
            if job.id in self._finished:
                return
            await self._post(job, messages.failed(job, message), None)
            self._forget(job.id)

    # -- internals --------------------------------------------------------------------------------

    def _lock(self, job_id: int) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    def _forget(self, job_id: int) -> None:
        self._finished[job_id] = None
        while len(self._finished) > 10_000:
            self._finished.popitem(last=False)
        self._last_edit.pop(job_id, None)
        self._status.pop(job_id, None)
        self._phase.pop(job_id, None)
        self._locks.pop(job_id, None)

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
        guild_id = job.delivery.get("guild_id") or job.guild_id
        return self.bot.get_partial_messageable(int(channel_id), guild_id=int(guild_id) if guild_id else None)

    def _upload_limit(self, job: JobView) -> int:
        if self._token_usable(job) and job.delivery.get("size_limit"):
            return int(job.delivery["size_limit"])
        guild = self.bot.get_guild(int(job.guild_id)) if job.guild_id else None
        return guild.filesize_limit if guild else discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES

    async def _status_update(self, job: JobView, text: str, phase: int) -> None:
        """A throttled edit of the job's status message (queue position, progress)."""
        if job.id in self._finished or self._phase.get(job.id, QUEUED) > phase:
            return
        now = time.monotonic()
        last = self._last_edit.get(job.id)
        if last is not None and now - last < self.config.progress_edit_interval_s:
            return
        self._last_edit[job.id] = now
        async with self._lock(job.id):
            if job.id in self._finished or self._phase.get(job.id, QUEUED) > phase:
                return
            self._phase[job.id] = phase
            if self._token_usable(job):
                await self._webhook(job).edit_message("@original", content=text)  # type: ignore[arg-type]
            elif job.delivery.get("mode") == "channel":
                status = self._status.get(job.id)
                channel = self._channel(job)
                if status is None:
                    sent = await channel.send(text, reference=self._reference(job))
                    self._status[job.id] = sent.id
                else:
                    await channel.get_partial_message(status).edit(content=text)
            # An interaction past its token: progress is not worth a channel message; the result is.

    def _reference(self, job: JobView) -> discord.MessageReference | None:
        parent = job.delivery.get("reply_to")
        if not parent:
            return None
        return discord.MessageReference(
            message_id=int(parent), channel_id=int(job.delivery["channel_id"]), fail_if_not_exists=False
        )

    async def _post(self, job: JobView, text: str, file: discord.File | None) -> discord.Message:
        """Show the final text (and file) where the user is looking, falling back to the channel."""
        kwargs: dict = {"content": text}
        if file is not None:
            kwargs["attachments"] = [file]
        if self._token_usable(job):
            try:
                return await self._webhook(job).edit_message("@original", **kwargs)  # type: ignore[arg-type]
            except discord.NotFound:
                log.info("job %s: the interaction response is gone; posting in the channel", job.id)
            except discord.HTTPException as e:
                if e.status not in (401, 403):
                    raise
                log.info("job %s: interaction token refused (%s); posting in the channel", job.id, e.status)
            if file is not None:
                file.reset()
        channel = self._channel(job)
        status = self._status.get(job.id)
        if status is not None:
            try:
                return await channel.get_partial_message(status).edit(**kwargs)
            except discord.NotFound:
                pass
        if file is not None:
            return await channel.send(text, file=file, reference=self._reference(job))
        return await channel.send(text, reference=self._reference(job))
