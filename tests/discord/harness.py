"""Run a real discord.py bot against the fake until a block exits, surfacing a dead bot task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

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
