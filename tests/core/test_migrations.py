"""Alembic migrations on a real SQLite file and a fresh PostgreSQL database: upgrade from empty,
downgrade, models and migrations agree, and the start-up check refuses an old schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from bot.backends.fake import FakeBackend
from bot.bootstrap import build_core
from bot.core.db import make_engine
from bot.core.models import Base
from bot.migrate import SchemaOutOfDate, current_revision, downgrade, ensure_schema, head_revision, upgrade
from tests.core.helpers import config_for

REPO = Path(__file__).resolve().parents[2]
TABLES = {
    "users",
    "quota_limits",
    "quota_usage",
    "jobs",
    "images",
    "audit_log",
    "model_settings",
    "channel_settings",
    "publications",
    "dispatcher_heartbeats",
}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    return request.getfixturevalue("fresh_pg_url")


def _diff(conn):
    return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def _tables(conn):
    return set(inspect(conn).get_table_names())


async def test_upgrade_from_empty_models_agree_downgrade_and_again(empty_db_url):
    engine = make_engine(empty_db_url, pool_size=1)
    try:
        assert await current_revision(engine) is None
        await upgrade(engine)
        assert await current_revision(engine) == head_revision()
        async with engine.connect() as conn:
            assert TABLES <= await conn.run_sync(_tables)
            diff = await conn.run_sync(_diff)
        assert diff == [], f"models and migrations disagree: {diff}"
        await downgrade(engine, "base")
        assert await current_revision(engine) is None
        async with engine.connect() as conn:
            assert not (TABLES & await conn.run_sync(_tables))
        await upgrade(engine)
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()


async def test_start_refuses_a_database_behind_the_code(empty_db_url, tmp_path):
    cfg = config_for(empty_db_url, tmp_path, database={"auto_migrate": False})
    with pytest.raises(SchemaOutOfDate) as err:
        async with build_core(cfg, {}, backend=FakeBackend()):
            pass
    assert "make migrate" in str(err.value) and "empty" in str(err.value)
    engine = make_engine(empty_db_url, pool_size=1)
    try:
        # configured to migrate: it does
        assert await ensure_schema(engine, auto_migrate=True) == head_revision()
        assert await ensure_schema(engine, auto_migrate=False) == head_revision()
        async with engine.begin() as conn:
            await conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00dfeed'")
        with pytest.raises(SchemaOutOfDate) as err:
            await ensure_schema(engine, auto_migrate=False)
        assert "newer than the code" in str(err.value)
    finally:
        await engine.dispose()


def test_make_migrate_command_upgrades_and_downgrades(tmp_path):
    db = tmp_path / "cli.db"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{db}", "PYTHONPATH": str(REPO)}

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "bot.migrate", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    up = run()
    assert up.returncode == 0, up.stderr
    assert f"(empty) -> {head_revision()}" in up.stdout
    status = run("--status")
    assert f"current: {head_revision()}" in status.stdout
    down = run("--downgrade", "base")
    assert down.returncode == 0 and f"{head_revision()} -> (empty)" in down.stdout
