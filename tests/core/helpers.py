"""Helpers shared by the core tests (imported as tests.core.helpers)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bot.backends.fake import FakeBackend
from bot.bootstrap import Core, build_core
from bot.core.api import Actor, JobView, Place, ResultImage
from bot.core.models import Job, utcnow


def config_for(url: str, tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "database": {"url": url, "auto_migrate": True},
        "storage": {"dir": str(tmp_path / "images")},
        # Fast polling so that cross-process tests don't wait; no progress throttling surprises.
        "bot": {"poll_interval_s": 0.05, "retry_backoff_s": 0.0},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


class RecordingDelivery:
    """A Delivery that records every callback (the adapter's side, as a test sees it)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.succeeded: dict[int, list[tuple[JobView, Sequence[ResultImage]]]] = {}
        self.failed: dict[int, list[tuple[JobView, str]]] = {}
        self._changed = asyncio.Event()

    async def on_queued(self, job: JobView, position: int) -> None:
        self.events.append(("queued", job.id, position))
        self._changed.set()

    async def on_waiting(self, job: JobView, message: str) -> None:
        self.events.append(("waiting", job.id, message))
        self._changed.set()

    async def on_progress(self, job: JobView, step: int, total: int) -> None:
        self.events.append(("progress", job.id, step, total))
        self._changed.set()

    async def on_preview(self, job: JobView, step: int, total: int, png: bytes) -> None:
        self.events.append(("preview", job.id, step, total, png))

    async def on_succeeded(self, job: JobView, images: Sequence[ResultImage]) -> None:
        self.events.append(("succeeded", job.id))
        self.succeeded.setdefault(job.id, []).append((job, images))
        self._changed.set()

    async def on_failed(self, job: JobView, message: str) -> None:
        self.events.append(("failed", job.id, message))
        self.failed.setdefault(job.id, []).append((job, message))
        self._changed.set()

    def finished(self) -> int:
        return len(self.succeeded) + len(self.failed)

    async def wait_for(self, predicate: Callable[[], bool], within_s: float = 60.0) -> None:
        async def loop() -> None:
            while not predicate():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await self._changed.wait()

        async with asyncio.timeout(within_s):
            await loop()


@contextlib.asynccontextmanager
async def running_core(
    url: str,
    tmp_path: Path,
    *,
    backend: FakeBackend | None = None,
    deliver: Sequence[str] = ("discord",),
    owner: str | None = None,
    start: bool = True,
    clock: Callable[[], dt.datetime] = utcnow,
    env: Mapping[str, str] | None = None,
    **sections: dict[str, Any],
) -> AsyncIterator[tuple[Core, RecordingDelivery]]:
    delivery = RecordingDelivery()
    async with build_core(
        config_for(url, tmp_path, **sections),
        dict(env or {}),
        backend=backend or FakeBackend(),
        dispatcher_owner=owner,
        start_dispatcher=start,
        clock=clock,
    ) as core:
        for platform in deliver:
            core.service.register_delivery(platform, delivery)
        yield core, delivery


ALICE = Actor("discord", "alice", "Alice")
BOB = Actor("discord", "bob", "Bob")
ADMIN = Actor("discord", "root", "Root", is_admin=True)
GUILD = Place("discord", "guild1", "chan1")


async def assert_succeeded_undelivered(core: Core, job_id: int) -> None:
    """The job's images are stored and nobody has delivered it, nor marked it failed to deliver:
    the next process with its platform's adapter delivers it."""
    async with core.db.read() as s:
        row = await s.get(Job, job_id)
    assert row is not None
    assert (row.state, row.delivered_at, row.delivery_error) == ("succeeded", None, None)
