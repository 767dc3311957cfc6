"""Slack adapter: slack-bolt `AsyncApp` over HTTP (Bolt's aiohttp adapter) or Socket Mode.

`adapter_status(env)` and `run(service, config, env, ready)` are the entry points `python -m bot`
uses (see `bot.__main__`). Importing this package is cheap: slack_bolt loads only when `run` starts.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bot.core.api import ImageService

if TYPE_CHECKING:
    from bot.ops import Ops

__all__ = ["adapter_status", "run"]


def adapter_status(env: Mapping[str, str]) -> tuple[bool, str]:
    """(on?, why) from the environment alone; no network."""
    token = env.get("SLACK_BOT_TOKEN", "")
    if not token:
        return False, "off: SLACK_BOT_TOKEN not set"
    if importlib.util.find_spec("slack_bolt") is None:
        return (
            False,
            "off: SLACK_BOT_TOKEN is set but slack-bolt is not installed (pip install 'imagine-bot[slack]')",
        )
    if not token.startswith("xoxb-"):
        return False, "off: SLACK_BOT_TOKEN is not a bot token (it should start with xoxb-)"
    app_token = env.get("SLACK_APP_TOKEN", "")
    if app_token:
        if not app_token.startswith("xapp-"):
            return False, "off: SLACK_APP_TOKEN is not an app-level token (it should start with xapp-)"
        return True, "on: Socket Mode (SLACK_APP_TOKEN set)"
    if not env.get("SLACK_SIGNING_SECRET"):
        return (
            False,
            "off: SLACK_SIGNING_SECRET not set (needed for HTTP mode; or set SLACK_APP_TOKEN for Socket Mode)",
        )
    return True, "on: HTTP mode (SLACK_APP_TOKEN not set)"


async def run(
    service: ImageService,
    config: Mapping[str, Any],
    env: Mapping[str, str],
    ready: asyncio.Event | None = None,
    ops: Ops | None = None,
) -> None:
    """Serve Slack until cancelled; `ready` is set once requests are accepted."""
    from bot.slack_adapter.runner import run_slack

    await run_slack(service, config, env, ready, ops)
