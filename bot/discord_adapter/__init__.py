"""Discord adapter: slash commands and reactions in, core requests out; core results back as messages.

Entry points used by `python -m bot` (see `bot.__main__`): `adapter_status(env)` and `run(...)`.
discord.py is imported only when the adapter runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bot.core.api import ImageService

if TYPE_CHECKING:
    from bot.ops import Ops

log = logging.getLogger(__name__)


def adapter_status(env: Mapping[str, str]) -> tuple[bool, str]:
    """On when DISCORD_TOKEN is set."""
    if not env.get("DISCORD_TOKEN", "").strip():
        return False, "off: DISCORD_TOKEN not set"
    if importlib.util.find_spec("discord") is None:
        return (
            False,
            "off: DISCORD_TOKEN is set but discord.py is not installed (pip install 'imagine-bot[discord]')",
        )
    return True, "on: DISCORD_TOKEN set"


async def run(
    service: ImageService,
    config: Mapping[str, Any],
    env: Mapping[str, str],
    ready: asyncio.Event | None = None,
    ops: Ops | None = None,
) -> None:
    """Run the bot until cancelled; close the gateway and unregister the delivery on the way out.
    `ops` is unused: the Discord bot serves no HTTP ([bot] metrics_port serves /metrics and /readyz)."""
    import discord

    from bot.discord_adapter.bot import ImagineBot
    from bot.discord_adapter.config import DiscordConfig
    from bot.settings import load_section

    cfg = load_section(config, "discord", DiscordConfig, environ=env)
    token = env.get("DISCORD_TOKEN", "").strip()
    if not token:
        raise RuntimeError("DISCORD_TOKEN is not set: the Discord adapter cannot log in")
    bot = ImagineBot(service, cfg)
    if ready is not None:

        async def _ready() -> None:
            await bot.wait_until_ready()
            ready.set()

    task = asyncio.create_task(bot.start(token), name="discord-adapter")
    waiter = asyncio.create_task(_ready()) if ready is not None else None
    try:
        await task
    except discord.LoginFailure as e:
        raise RuntimeError(f"Discord refused DISCORD_TOKEN: {e}") from None
    finally:
        if waiter is not None:
            waiter.cancel()
        if not bot.is_closed():
            await bot.close()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
