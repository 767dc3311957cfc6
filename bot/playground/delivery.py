"""Delivery for platform "web": fans the core's job events out to the browser handlers waiting on them.

The core calls these methods from its dispatcher task; a Gradio handler streaming a job subscribes
to that job's events with `subscribe(job_id)`. Nothing is lost when no browser is listening (a job
finished after a restart, a closed tab): the result is in the job row and the history tab reads it
from there. Handlers also re-read the row now and then, so a job delivered by another process
sharing the database still completes in the browser.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.core.api import JobView, ResultImage
from bot.playground import texts

log = logging.getLogger("bot.playground")

EventKind = Literal["queued", "progress", "preview", "succeeded", "failed"]


@dataclass(frozen=True)
class JobEvent:
    kind: EventKind
    job: JobView
    position: int | None = None
    step: int = 0
    total: int = 0
    images: Sequence[ResultImage] = ()
    message: str = ""
    png: bytes = b""  # a "preview": the first image as it forms

    @property
    def final(self) -> bool:
        return self.kind in ("succeeded", "failed")


def message_id_for(job_id: int) -> str:
    """The "platform message" of a result in the playground: reactions resolve through it."""
    return f"web-job-{job_id}"


@dataclass
class WebDelivery:
    service: Any
    _subscribers: dict[int, list[asyncio.Queue[JobEvent]]] = field(default_factory=dict)

    def subscribe(self, job_id: int) -> asyncio.Queue[JobEvent]:
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._subscribers.setdefault(job_id, []).append(queue)
        return queue

    def unsubscribe(self, job_id: int, queue: asyncio.Queue[JobEvent]) -> None:
        queues = self._subscribers.get(job_id, [])
        if queue in queues:
            queues.remove(queue)
        if not queues:
            self._subscribers.pop(job_id, None)

    def _publish(self, event: JobEvent) -> None:
        for queue in self._subscribers.get(event.job.id, []):
            queue.put_nowait(event)

    async def on_queued(self, job: JobView, position: int) -> None:
        self._publish(JobEvent("queued", job, position=position))

    async def on_waiting(self, job: JobView, message: str) -> None:
        # Shown like a queue position: the job waits, for a server rather than for its turn.
        self._publish(JobEvent("queued", job, message=texts.waiting(job, message)))

    async def on_progress(self, job: JobView, step: int, total: int) -> None:
        self._publish(JobEvent("progress", job, step=step, total=total))

    async def on_preview(self, job: JobView, step: int, total: int, png: bytes) -> None:
        self._publish(JobEvent("preview", job, step=step, total=total, png=png))

    async def on_succeeded(self, job: JobView, images: Sequence[ResultImage]) -> None:
        # The "message" showing the result is the job itself; recording it lets `react` (and the
        # re-roll / variation buttons) resolve to the row after a restart, as on the chat platforms.
        await self.service.attach_result_message(job.id, message_id_for(job.id))
        self._publish(JobEvent("succeeded", job, images=tuple(images)))

    async def on_failed(self, job: JobView, message: str) -> None:
        self._publish(JobEvent("failed", job, message=message))
