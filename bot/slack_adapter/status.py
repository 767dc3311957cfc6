"""The per-job status message ("queued, position 2" -> "step 5/20"), edited in place, with a Cancel
button while the job waits or runs. When the job ends it becomes the failure (or the cancellation),
or it is removed once the result is shared (`retire`): every job leaves one message.

Its `ts` is known only once the first edit is posted, after the job row (and its `delivery`) was
written, so it is kept here in memory and also added to the job's `delivery` (`status_ts`,
`status_channel`) through the core. After a restart the process that takes the job over finds it
there and goes on editing the same message, instead of leaving the old one stuck at "step 5/20" and
posting a second one. If that write fails the status message is still shown; only a restart would
then post a fresh one.

Updates race: the command handler announces "queued" while the dispatcher may already report
progress or the result. A per-job lock orders the posts and a phase number makes sure a late
"queued" never overwrites "running" or "done".

Throttling: queue and progress edits of one message are at least `min_interval_s` apart. An update
that comes too early is not dropped but parked; the latest parked text is shown once the interval
has passed (unless the job finished meanwhile), so the message never lags behind for long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.core.api import JobView

log = logging.getLogger("bot.slack")

QUEUED, RUNNING, DONE = 1, 2, 3

# Jobs remembered at once; old finished entries are dropped first. A few thousand in-flight jobs is
# far more than one bot serves, and an entry is ~200 bytes.
MAX_TRACKED_JOBS = 4096


@dataclass(frozen=True)
class _Posted:
    """The status message on Slack: its channel and timestamp (Slack's message id)."""

    channel: str
    ts: str


@dataclass
class _Entry:
    job: JobView | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    message: _Posted | None = None
    phase: int = 0
    last_edit: float = 0.0
    parked: tuple[int, str] | None = None  # (phase, text) waiting for the interval to pass
    flusher: asyncio.Task[None] | None = None


def job_channel(job: JobView) -> str | None:
    return job.delivery.get("channel") or job.channel_id


# Keeps a posted status message's ids with the job: (job id, {"status_ts": ..., "status_channel": ...}).
Remember = Callable[[int, Mapping[str, str]], Awaitable[None]]
# The Block Kit blocks of a status: its text and, while the job waits or runs, its Cancel button.
Blocks = Callable[[JobView, str, bool], list[dict[str, Any]]]


class StatusBoard:
    def __init__(
        self,
        client: AsyncWebClient,
        min_interval_s: float,
        remember: Remember | None = None,
        blocks: Blocks | None = None,
    ) -> None:
        self._client = client
        self._min_interval_s = min_interval_s
        self._remember = remember
        self._blocks = blocks
        self._entries: OrderedDict[int, _Entry] = OrderedDict()

    def _entry(self, job: JobView) -> _Entry:
        entry = self._entries.get(job.id)
        if entry is None:
            # A message posted before a restart (or by another process) is edited, not posted again.
            ts, channel = job.delivery.get("status_ts"), job.delivery.get("status_channel")
            entry = self._entries[job.id] = _Entry(
                job=job, message=None if ts is None or channel is None else _Posted(channel, ts)
            )
            while len(self._entries) > MAX_TRACKED_JOBS:
                _, old = self._entries.popitem(last=False)
                if old.flusher is not None:
                    old.flusher.cancel()
        return entry

    async def show(
        self,
        job: JobView,
        phase: int,
        text: str,
        *,
        throttle: bool = False,
        post: bool = True,
        edit: bool = True,
    ) -> str | None:
        """Show `text` for `job` unless a later phase is already shown. With `throttle`, an edit
        within `min_interval_s` of the previous one is parked and shown when the interval is over.
        `post=False` only edits an existing message; `edit=False` only posts one if there is none
        yet (the submit-time announcement must not overwrite fresher news).
        Returns Slack's error code when the call failed (e.g. "not_in_channel"), else None."""
        channel = job_channel(job)
        if channel is None:
            return None
        entry = self._entry(job)
        async with entry.lock:
            if phase < entry.phase or (not edit and entry.message is not None):
                return None
            if phase == DONE:
                entry.parked = None
            elif throttle and entry.message is not None:
                wait = entry.last_edit + self._min_interval_s - time.monotonic()
                if wait > 0:
                    entry.parked = (phase, text)
                    if entry.flusher is None:
                        entry.flusher = asyncio.create_task(self._flush_later(job.id, entry, wait))
                    return None
            return await self._write(job, entry, channel, phase, text, post)

    def _blocks_for(self, job: JobView, text: str, phase: int) -> list[dict[str, Any]]:
        return self._blocks(job, text, phase < DONE) if self._blocks is not None else []

    async def _write(
        self, job: JobView, entry: _Entry, channel: str, phase: int, text: str, post: bool
    ) -> str | None:
        entry.phase = phase
        entry.parked = None
        blocks = self._blocks_for(job, text, phase)
        try:
            if entry.message is not None:
                await self._client.chat_update(
                    channel=entry.message.channel, ts=entry.message.ts, text=text, blocks=blocks
                )
            elif post:
                resp = await self._client.chat_postMessage(
                    channel=channel, text=text, blocks=blocks or None, thread_ts=job.delivery.get("thread_ts")
                )
                entry.message = _Posted(resp["channel"], resp["ts"])
                await self._keep(job.id, entry.message)
            entry.last_edit = time.monotonic()
        except SlackApiError as e:
            # A status line is not worth failing a job for; the result is delivered separately.
            log.warning("slack: status update for job %s failed: %s", job.id, e.response.get("error"))
            return str(e.response.get("error"))
        return None

    async def _flush_later(self, job_id: int, entry: _Entry, wait: float) -> None:
        try:
            await asyncio.sleep(wait)
            async with entry.lock:
                parked, entry.parked = entry.parked, None
                message = entry.message
                if parked is None or message is None or parked[0] < entry.phase or entry.phase == DONE:
                    return
                phase, text = parked
                entry.phase = phase
                try:
                    await self._client.chat_update(
                        channel=message.channel,
                        ts=message.ts,
                        text=text,
                        blocks=self._blocks_for_id(job_id, text, phase),
                    )
                    entry.last_edit = time.monotonic()
                except SlackApiError as e:
                    log.warning("slack: status update for job %s failed: %s", job_id, e.response.get("error"))
        finally:
            entry.flusher = None

    def _blocks_for_id(self, job_id: int, text: str, phase: int) -> list[dict[str, Any]]:
        entry = self._entries.get(job_id)
        return self._blocks_for(entry.job, text, phase) if entry is not None and entry.job is not None else []

    async def _keep(self, job_id: int, message: _Posted) -> None:
        if self._remember is None:
            return
        try:
            await self._remember(job_id, {"status_ts": message.ts, "status_channel": message.channel})
        except Exception:  # the message is shown either way; only a restart would post a second one
            log.warning("slack: could not record the status message of job %s", job_id, exc_info=True)

    def has_message(self, job: JobView) -> bool:
        return self._entry(job).message is not None

    async def retire(self, job: JobView) -> None:
        """The job's result is shown in a message of its own: remove the status message (one
        message per job), and show nothing more for it."""
        entry = self._entry(job)
        async with entry.lock:
            entry.phase = DONE
            entry.parked = None
            message, entry.message = entry.message, None
            if message is None:
                return
            try:
                await self._client.chat_delete(channel=message.channel, ts=message.ts)
            except SlackApiError as e:
                # Gone already (deleted by someone, or by an earlier attempt before a restart).
                log.info("slack: status message of job %s not removed: %s", job.id, e.response.get("error"))

    async def close(self) -> None:
        """Cancel parked updates (at shutdown)."""
        tasks = [e.flusher for e in self._entries.values() if e.flusher is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
