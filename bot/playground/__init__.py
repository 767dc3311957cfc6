"""The web playground: a local Gradio app that is one more adapter on the same core.

`adapter_status(env)` and `run(service, config, env, ready)` are the entry points `python -m bot`
uses (see `bot.__main__`). Importing this package is cheap: gradio, FastAPI and uvicorn load only
when `run` starts.
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
    """(on?, why) from the environment alone. The playground is on unless gradio is missing or
    `IMAGINE_PLAYGROUND_ENABLED` turns it off."""
    flag = env.get("IMAGINE_PLAYGROUND_ENABLED", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False, "off: IMAGINE_PLAYGROUND_ENABLED is false"
    if importlib.util.find_spec("gradio") is None:
        return False, "off: gradio is not installed (pip install 'imagine-bot[playground]')"
    if env.get("PLAYGROUND_PASSWORD"):
        return True, "on: web playground, password required (PLAYGROUND_PASSWORD set)"
    return True, "on: web playground (local user, no password: loopback only)"


async def run(
    service: ImageService,
    config: Mapping[str, Any],
    env: Mapping[str, str],
    ready: asyncio.Event | None = None,
    ops: Ops | None = None,
) -> None:
    """Serve the playground until cancelled; `ready` is set once it answers HTTP."""
    from bot.playground.server import run_playground

    await run_playground(service, config, env, ready, ops)
