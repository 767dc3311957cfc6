"""Fixtures for the core's tests: a real SQLite file and a real PostgreSQL database per session.

PostgreSQL: `DATABASE_URL_TEST` (default postgresql+asyncpg://postgres@127.0.0.1:5432/test) is used
only to create and drop our own database `imagine_test_<random>`, so parallel runs never collide.
If the server is unreachable the PostgreSQL cases are skipped with the reason, unless
IMAGINE_REQUIRE_POSTGRES=1 (CI), where that is a failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bot.config import normalize_database_url
from bot.core.db import make_engine
from bot.migrate import upgrade
from tests.core.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures of the storage tests

PG_DEFAULT = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
TABLES = (
    "audit_log",
    "channel_settings",
    "dispatcher_heartbeats",
    "images",
    "jobs",
    "model_settings",
    "publications",
    "quota_usage",
    "quota_limits",
    "users",
)


def run_in_thread(coro_fn: Any) -> Any:
    """Run `coro_fn()` on a private event loop in a thread: session fixtures may be set up from
    inside a test's running loop, where asyncio.run() is not allowed."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro_fn())).result()


def pg_admin_url() -> str:
    return normalize_database_url(os.environ.get("DATABASE_URL_TEST", PG_DEFAULT))


async def _pg_admin(sql: str) -> None:
    engine = create_async_engine(pg_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


def pg_unavailable_reason() -> str | None:
    async def probe() -> None:
        await asyncio.wait_for(_pg_admin("select 1"), 10)

    try:
        run_in_thread(probe)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
        return f"PostgreSQL not reachable at {make_url(pg_admin_url()).render_as_string(hide_password=True)}: {e!r}"
    return None


def create_pg_database() -> str:
    """Create a fresh database; return its URL."""
    name = f"imagine_test_{uuid.uuid4().hex[:12]}"
    run_in_thread(lambda: _pg_admin(f'CREATE DATABASE "{name}"'))
    return make_url(pg_admin_url()).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    name = make_url(url).database
    with contextlib.suppress(Exception):
        run_in_thread(lambda: _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_available() -> None:
    reason = pg_unavailable_reason()
    if reason is not None:
        if os.environ.get("IMAGINE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"IMAGINE_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_session_url(pg_available: None) -> Any:
    """One migrated database for the session; tests empty its tables before use."""
    url = create_pg_database()

    async def migrate() -> None:
        engine = make_engine(url, pool_size=1)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    run_in_thread(migrate)
    yield url
    drop_pg_database(url)


@pytest.fixture
def fresh_pg_url(pg_available: None) -> Any:
    """An empty database of its own (for migration tests)."""
    url = create_pg_database()
    yield url
    drop_pg_database(url)


async def truncate(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'imagine.db'}"
    url = request.getfixturevalue("pg_session_url")
    await truncate(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'imagine.db'}"
