"""Run a real discord.py bot against the fake until a block exits, surfacing a dead bot task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import discord

from tests.discord.fake_discord import FakeDiscord


@contextlib.asynccontextmanager
async def running(bot: discord.Client, fake: FakeDiscord, within: float = 15.0) -> AsyncIterator[discord.Client]:
    """Run `bot.start()` against the fake until the block exits; fail loudly if the bot task dies.

    A malformed gateway payload ends `bot.start()` without any other sign, so the harness waits for
    readiness *or* the task's end and re-raises what killed it instead of hanging.
    """
    task = asyncio.create_task(bot.start(fake.token), name="discord-bot")
    ready = asyncio.create_task(bot.wait_until_ready())
    done, _ = await asyncio.wait({task, ready}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()  # re-raises the error that stopped the bot
        raise AssertionError("bot.start() returned before READY")
    if ready not in done:
        ready.cancel()
        task.cancel()
        raise AssertionError(f"bot not ready after {within}s")
    try:
        yield bot
    finally:
        await bot.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


def app_config(tmp: Path, fake: FakeDiscord, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping for the real core (SQLite and images under `tmp`, the in-process fake backend)
    and the adapter (commands synced to the fake's guild, no progress throttling unless asked)."""
    config: dict[str, Any] = {
        "bot": {"progress_interval_s": 0.0, "poll_interval_s": 0.05, "retry_backoff_s": 0.0},
        "database": {"url": f"sqlite+aiosqlite:///{tmp / 'imagine.db'}", "auto_migrate": True},
        "storage": {"dir": str(tmp / "images")},
        "backends": {"kind": "fake"},
        "discord": {"guild_ids": [fake.guild_id], "progress_edit_interval_s": 0.0,
                    "guild_ready_timeout_s": 0.05},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


class App:
    """The real core (`bot.bootstrap.build_core`) and the adapter's `run()` entry point, against the
    fake Discord. `async with App(...) as app:`; `app.service` is the core facade."""

    def __init__(self, fake: FakeDiscord, config: Mapping[str, Any], backend: Any = None):
        self.fake = fake
        self.config = config
        self.backend = backend  # a FakeBackend to control; None: the one [backends] describes
        self.core: Any = None
        self.env = {"DISCORD_TOKEN": fake.token}
        self.service: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> App:
        from bot.bootstrap import build_core
        from bot.discord_adapter import run

        self.core = await self._stack.enter_async_context(build_core(self.config, self.env, backend=self.backend))
        self.service = self.core.service
        self.backend = self.core.backend
        ready = asyncio.Event()
        self._task = asyncio.create_task(run(self.service, self.config, self.env, ready), name="discord-adapter")
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({self._task, waiter}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            await self._stack.aclose()
            self._task.result()
            raise AssertionError("the adapter's run() returned before the bot was ready")
        if waiter not in done:
            waiter.cancel()
            await self.__aexit__(None, None, None)
            raise AssertionError("the bot did not become ready in 20 s")
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._task is not None:
                if self._task.done() and not self._task.cancelled() and self._task.exception():
                    raise self._task.exception()  # type: ignore[misc]
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(self._task, 10)
        finally:
            await self._stack.aclose()

    def check_alive(self) -> None:
        """Re-raise what killed the adapter, if anything did."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None:
                raise exc


def image_size(data: bytes) -> tuple[int, int]:
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(data)) as img:
        img.load()
        return img.size


async def wait_result(fake: FakeDiscord, rec: Any, within: float = 20.0) -> dict:
    """The interaction's response message once it shows an image (the job's result)."""
    return await fake.wait_for(
        lambda: rec.original if rec.original and rec.original["attachments"] else None,
        within=within, what=f"the result of /{rec.name}",
    )


async def wait_ephemeral(fake: FakeDiscord, rec: Any, within: float = 10.0) -> str:
    """The text of the private (ephemeral) answer to an interaction."""
    def find() -> str | None:
        for c in rec.callbacks:
            data = c["body"].get("data") or {}
            if c["status"] == 200 and data.get("flags", 0) & 64 and data.get("content"):
                return data["content"]
        for m in rec.followups:
            if m["flags"] & 64 and m["content"]:
                return m["content"]
        return None
    return await fake.wait_for(find, within=within, what=f"an ephemeral answer to /{rec.name}")


async def result_job(app: App, message: dict, within: float = 10.0) -> Any:
    """The job row a result message resolves to (recorded just after the message is posted)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        job = await app.service.job_for_message("discord", str(message["id"]))
        if job is not None:
            return job
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"message {message['id']} never resolved to a job")
        await asyncio.sleep(0.02)
