"""Run the real core and the playground adapter in this event loop, for tests and screenshots."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.ports import free_port

CHROMIUM = "/usr/bin/chromium"
# Headless and quiet: no GPU, no sandbox (root in CI), and nothing that phones home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def app_config(tmp: Path, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """The real core on SQLite under `tmp` with the in-process fake backend (a fake of the image
    backend only), and the playground on a free loopback port."""
    config: dict[str, Any] = {
        "bot": {
            "progress_interval_s": 0.0,
            "poll_interval_s": 0.05,
            "retry_backoff_s": 0.0,
            "default_steps": 4,
        },
        "database": {"url": f"sqlite+aiosqlite:///{tmp / 'imagine.db'}", "auto_migrate": True},
        "storage": {"dir": str(tmp / "images")},
        "backends": {"kind": "fake", "fake_delay_s": 0.3},
        "playground": {"port": free_port(), "poll_interval_s": 0.2},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


@dataclass
class Running:
    url: str
    core: Any
    config: Mapping[str, Any]

    @property
    def service(self) -> Any:
        return self.core.service


@contextlib.asynccontextmanager
async def running_playground(
    config: Mapping[str, Any], env: Mapping[str, str] | None = None, backend: Any = None
) -> AsyncIterator[Running]:
    from bot.bootstrap import build_core
    from bot.playground import run

    env = dict(env or {})
    async with build_core(config, env, backend=backend) as core:
        ready = asyncio.Event()
        task = asyncio.create_task(run(core.service, config, env, ready, ops=core.ops), name="playground")
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({task, waiter}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            waiter.cancel()
            task.result()
            raise AssertionError("the playground stopped during start-up")
        if waiter not in done:
            task.cancel()
            raise AssertionError("the playground was not ready after 120 s")
        host = config["playground"].get("host", "127.0.0.1")
        try:
            yield Running(f"http://{host}:{config['playground']['port']}/", core, config)
        finally:
            await core.dispatcher.stop()  # first, as `python -m bot` does: see tests/slack/harness.py
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
