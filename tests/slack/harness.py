"""Run the real Slack adapter (`bot.slack_adapter.run`) on the real core against the fake Slack.

Only Slack is faked: the core is built by `bot.bootstrap.build_core` on a SQLite file in a tmp dir
with the in-process FakeBackend, the adapter is the production entry point with its Web API client
pointed at `FakeSlack` by `[slack] api_base_url`, and requests reach Bolt's aiohttp app as real
signed HTTP POSTs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bot import slack_adapter
from bot.bootstrap import build_core
from bot.config import normalize_database_url
from tests.ports import free_port
from tests.slack.fake_slack import BOT_TOKEN, BOT_USER_ID, FakeMessage, FakeSlack
from tests.slack.signed import SIGNING_SECRET, SlackSender

ADMIN_ID = "UADMIN01"


PG_DEFAULT = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A database of its own on the test server (`DATABASE_URL_TEST`), dropped afterwards. Skips with
    the reason when the server is unreachable; fails instead under IMAGINE_REQUIRE_POSTGRES=1 (CI)."""
    admin_url = normalize_database_url(os.environ.get("DATABASE_URL_TEST", PG_DEFAULT))
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"imagine_slack_{uuid.uuid4().hex[:12]}"
    try:
        try:
            async with asyncio.timeout(10), engine.connect() as conn:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
        except Exception as e:  # any failure means "no usable PostgreSQL here"
            where = make_url(admin_url).render_as_string(hide_password=True)
            reason = f"PostgreSQL not reachable at {where}: {e!r}"
            if os.environ.get("IMAGINE_REQUIRE_POSTGRES") == "1":
                pytest.fail(f"IMAGINE_REQUIRE_POSTGRES=1 but {reason}")
            pytest.skip(reason)
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            async with engine.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await engine.dispose()


def result_messages(fake: FakeSlack, channel: str = "CGENERAL1") -> list[FakeMessage]:
    """Messages in `channel` that show uploaded files (the bot's results), oldest first."""
    return [m for (c, _), m in fake.messages.items() if c == channel and m.files]


def reaction(name: str, msg, user: str = "UBOB0001") -> dict:
    return {
        "type": "reaction_added",
        "user": user,
        "reaction": name,
        "item_user": BOT_USER_ID,
        "item": {"type": "message", "channel": msg.channel, "ts": msg.ts},
        "event_ts": f"{time.time():.6f}",
    }


def make_config(
    tmp: Path, fake: FakeSlack, port: int, sections: dict[str, dict[str, Any]] | None = None, **slack: Any
) -> dict[str, Any]:
    config: dict[str, dict[str, Any]] = {
        "database": {"url": f"sqlite+aiosqlite:///{tmp / 'bot.db'}", "auto_migrate": True},
        "storage": {"dir": str(tmp / "images")},
        "backends": {"kind": "fake"},
        # fast polling and no core-side progress throttle: the adapter's own throttle is under test
        # A short grace at the stop: tests that simulate a crash leave a delivery hanging on purpose.
        "bot": {
            "poll_interval_s": 0.1,
            "progress_interval_s": 0.0,
            "retry_backoff_s": 0.1,
            "shutdown_grace_s": 1.0,
        },
        "slack": {
            "api_base_url": fake.api_url,
            "http_host": "127.0.0.1",
            "http_port": port,
            "admin_user_ids": [ADMIN_ID],
            # the fake hosts users' files itself: its origin stands in for files.slack.com
            "file_hosts": [fake.base_url],
            **slack,
        },
    }
    for name, values in (sections or {}).items():
        config.setdefault(name, {}).update(values)
    return config


ENV = {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET}


@dataclass
class Running:
    fake: FakeSlack
    sender: SlackSender
    core: Any
    config: dict[str, Any]

    @property
    def service(self) -> Any:
        return self.core.service

    @property
    def backend(self) -> Any:
        return self.core.backend


async def _dump_tasks_after(delay_s: float) -> None:
    """Diagnostics for a hang: print every asyncio task's stack before pytest-timeout (120 s) fires,
    which shows only threads, where an idle event loop tells nothing."""
    await asyncio.sleep(delay_s)
    print(f"--- asyncio tasks still pending after {delay_s:.0f} s ---", file=sys.stderr)
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


@contextlib.asynccontextmanager
async def running_adapter(
    fake: FakeSlack,
    tmp: Path,
    http: aiohttp.ClientSession,
    env: dict[str, str] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    **slack: Any,
) -> AsyncIterator[Running]:
    port = free_port()
    config = make_config(tmp, fake, port, sections, **slack)
    watchdog = asyncio.create_task(_dump_tasks_after(100))
    try:
        async with build_core(config, dict(env or ENV)) as core:
            ready = asyncio.Event()
            task = asyncio.create_task(
                slack_adapter.run(core.service, config, dict(env or ENV), ready, ops=core.ops)
            )
            waiter = asyncio.create_task(ready.wait())
            done, _ = await asyncio.wait({task, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                waiter.cancel()
                task.result()
                raise AssertionError("slack_adapter.run returned before it was ready")
            if waiter not in done:
                task.cancel()
                raise AssertionError("slack adapter not ready after 60 s")
            sender = SlackSender(http, f"http://127.0.0.1:{port}/slack/events", fake.base_url)
            try:
                yield Running(fake, sender, core, config)
            finally:
                # The order of `python -m bot`: the dispatcher stops while the adapter is still
                # open (deliveries in flight finish), then the adapter closes, then the core.
                await core.dispatcher.stop()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    async with asyncio.timeout(30):  # a stop that hangs is a bug: fail, don't wait forever
                        await task
    finally:
        watchdog.cancel()
