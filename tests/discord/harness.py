"""Run a real discord.py bot against the fake until a block exits, surfacing a dead bot task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import discord

from tests.discord.fake_discord import FakeDiscord

log = logging.getLogger("tests.discord")


@contextlib.asynccontextmanager
async def running(
    bot: discord.Client, fake: FakeDiscord, within: float = 60.0
) -> AsyncIterator[discord.Client]:
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
        # A short grace at the stop: tests that simulate a crash or an outage leave a delivery
        # hanging on purpose.
        "bot": {
            "progress_interval_s": 0.0,
            "poll_interval_s": 0.05,
            "retry_backoff_s": 0.0,
            "shutdown_grace_s": 1.0,
        },
        "database": {"url": f"sqlite+aiosqlite:///{tmp / 'imagine.db'}", "auto_migrate": True},
        "storage": {"dir": str(tmp / "images")},
        "backends": {"kind": "fake"},
        "discord": {
            "guild_ids": [fake.guild_id],
            "progress_edit_interval_s": 0.0,
            "guild_ready_timeout_s": 0.05,
        },
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

        log.info("app: building the core")
        self.core = await self._stack.enter_async_context(
            build_core(self.config, self.env, backend=self.backend)
        )
        log.info("app: core built; starting the adapter")
        self.service = self.core.service
        self.backend = self.core.backend
        ready = asyncio.Event()
        self._task = asyncio.create_task(
            run(self.service, self.config, self.env, ready), name="discord-adapter"
        )
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({self._task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        log.info("app: adapter ready=%s run-ended=%s", waiter in done, self._task in done)
        if self._task in done:
            waiter.cancel()
            await _stop_dispatcher_loop(self.core)
            await self._stack.aclose()
            self._task.result()
            raise AssertionError("the adapter's run() returned before the bot was ready")
        if waiter not in done:
            waiter.cancel()
            await self.__aexit__(None, None, None)
            raise AssertionError("the bot did not become ready in 60 s")
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            # The order of `python -m bot` (bot.__main__): the dispatcher stops while the adapter
            # is still open (deliveries in flight finish), then the adapter closes, then the core.
            await _stop_dispatcher_loop(self.core)
            await self.core.dispatcher.stop()
            if self._task is not None:
                if self._task.done() and not self._task.cancelled() and self._task.exception():
                    raise self._task.exception()  # type: ignore[misc]
                log.info("app: stopping the adapter")
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(self._task, 10)
        finally:
            log.info("app: stopping the core")
            await _stop_dispatcher_loop(self.core)
            await self._stack.aclose()
            log.info("app: stopped")

    def check_alive(self) -> None:
        """Re-raise what killed the adapter, if anything did."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None:
                raise exc


async def _stop_dispatcher_loop(core: Any) -> None:
    """Work around a CPython 3.11 `asyncio.wait_for` bug (gh-86296): a cancel that arrives just as the
    dispatcher's wake-up wait completes is swallowed, and `Dispatcher.stop()` then awaits its loop
    forever. Cancel the loop until it really ends; `build_core`'s own shutdown does the rest.
    Remove once the dispatcher stops its loop this way itself."""
    main = getattr(getattr(core, "dispatcher", None), "_main", None)
    while main is not None and not main.done():
        main.cancel()
        await asyncio.wait({main}, timeout=0.5)


def image_size(data: bytes) -> tuple[int, int]:
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(data)) as img:
        img.load()
        return img.size


async def wait_result(fake: FakeDiscord, rec: Any, within: float = 60.0) -> dict:
    """The interaction's response message once it shows an image (the job's result)."""
    return await fake.wait_for(
        lambda: rec.original if rec.original and rec.original["attachments"] else None,
        within=within,
        what=f"the result of /{rec.name}",
    )


async def wait_ephemeral(fake: FakeDiscord, rec: Any, within: float = 60.0) -> str:
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


async def result_job(app: App, message: dict, within: float = 60.0) -> Any:
    """The job row a result message resolves to (recorded just after the message is posted)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        job = await app.service.job_for_message("discord", str(message["id"]))
        if job is not None:
            return job
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"message {message['id']} never resolved to a job")
        await asyncio.sleep(0.02)
