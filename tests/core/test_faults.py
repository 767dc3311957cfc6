"""Faults of what the core stands on: an image storage that cannot be written, database connections
terminated under load. A job must fail at once with a message that says why, or finish exactly once;
it must never sit `running` until its lease expires and then run again."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bot.backends.fake import FakeBackend
from bot.core import db as db_module
from bot.core.api import DatabaseError, StorageError
from bot.core.db import Database, make_engine
from bot.core.models import Job
from tests.core.conftest import truncate
from tests.core.helpers import ALICE, GUILD, running_core


def break_storage(root: Path) -> None:
    """Make the image storage unwritable for any user, root included: its directory becomes a
    plain file, so every write below it fails with a real OSError (ENOTDIR), as a vanished mount or
    a full/read-only disk fails."""
    shutil.rmtree(root, ignore_errors=True)
    root.write_text("the disk holding the images is gone\n")


def png(size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (0, 120, 255) if mode == "RGB" else (0, 120, 255, 0)).save(buf, format="PNG")
    return buf.getvalue()


async def test_unwritable_storage_fails_the_job_at_once_and_refunds(db_url, tmp_path):
    backend = FakeBackend()
    # A 10-minute lease: a job left to lease expiry would not finish within this test.
    async with running_core(db_url, tmp_path, backend=backend, bot={"lease_s": 600.0}) as (core, delivery):
        break_storage(tmp_path / "images")
        job = await core.service.imagine(ALICE, GUILD, "a lighthouse --n 2", idempotency_key="s1")
        await delivery.wait_for(lambda: job.id in delivery.failed, within_s=30)
        view = await core.service.get_job(job.id)
        assert (view.state, view.attempts) == ("failed", 1)
        assert "storage" in view.error and "refunded" in view.error
        [(_, message)] = delivery.failed[job.id]
        assert "storage" in message
        assert len(backend.calls) == 1  # generated once, not again after a lease
        assert (await core.service.quota(ALICE, GUILD)).used_today == 0


async def test_inpaint_with_unwritable_storage_is_a_core_error(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        break_storage(tmp_path / "images")
        with pytest.raises(StorageError) as err:
            await core.service.inpaint(ALICE, GUILD, "a hat", png(mode="RGBA"), None, idempotency_key="i1")
        assert "storage" in err.value.message
        async with core.db.read() as s:
            assert (await s.execute(select(func.count()).select_from(Job))).scalar_one() == 0
        assert (await core.service.quota(ALICE, GUILD)).used_today == 0


async def test_input_image_gone_from_storage_fails_the_job_at_once(db_url, tmp_path):
    """A queued inpaint whose stored input vanished (storage wiped between submit and run)."""
    backend = FakeBackend()
    async with running_core(db_url, tmp_path, backend=backend, start=False, bot={"lease_s": 600.0}) as (
        core,
        _,
    ):
        job = await core.service.inpaint(ALICE, GUILD, "a hat", png(mode="RGBA"), None, idempotency_key="i2")
    shutil.rmtree(tmp_path / "images")
    async with running_core(db_url, tmp_path, backend=backend, bot={"lease_s": 600.0}) as (core, delivery):
        await delivery.wait_for(lambda: job.id in delivery.failed, within_s=30)
        view = await core.service.get_job(job.id)
        assert view.state == "failed" and "storage" in view.error
        assert backend.calls == []
        assert (await core.service.quota(ALICE, GUILD)).used_today == 0


async def _terminate_backends_until(url: str, stop: asyncio.Event, interval_s: float) -> int:
    """Terminate every other connection to `url`'s database (pg_terminate_backend, as a failover or
    an admin does) every `interval_s` until `stop`; return how many were terminated."""
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    killed = 0
    try:
        async with engine.connect() as conn:
            while not stop.is_set():
                rows = await conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": make_url(url).database},
                )
                killed += sum(1 for (ok,) in rows if ok)
                try:
                    await asyncio.wait_for(stop.wait(), interval_s)
                except TimeoutError:
                    pass
    finally:
        await engine.dispose()
    return killed


@pytest.mark.postgres
async def test_terminated_connections_run_no_job_twice_and_leave_none_running(pg_session_url, tmp_path):
    """A storm of terminated connections while 20 jobs run: every job finishes, each generated and
    delivered exactly once, quota exact. The lease is 10 minutes: a job left `running` to be taken
    over after its lease would not finish within this test."""
    url = pg_session_url
    await truncate(url)
    backend = FakeBackend(delay_s=0.15)
    async with running_core(
        url, tmp_path, backend=backend, bot={"lease_s": 600.0, "dispatch_concurrency": 4}
    ) as (core, delivery):
        stop = asyncio.Event()
        storm = asyncio.create_task(_terminate_backends_until(url, stop, 0.05))
        jobs = []
        for i in range(20):
            # A submission that meets a dead connection is refused with DatabaseError (the user
            # would try again); the same idempotency key makes the retry the same job. Under a storm
            # that kills every connection each 50 ms a slow machine may need many tries.
            async with asyncio.timeout(60):
                while True:
                    try:
                        jobs.append(
                            await core.service.imagine(ALICE, GUILD, f"storm {i}", idempotency_key=f"k{i}")
                        )
                        break
                    except DatabaseError as e:
                        assert e.kind == "unavailable", e.message
                        await asyncio.sleep(0.02)
        await delivery.wait_for(lambda: len(delivery.succeeded) == 20, within_s=90)
        stop.set()
        killed = await storm
        assert killed > 0  # the storm really hit the bot's connections
        assert sorted(c.params.prompt for c in backend.calls) == sorted(f"storm {i}" for i in range(20))
        assert all(len(v) == 1 for v in delivery.succeeded.values())
        assert delivery.failed == {}
        await asyncio.sleep(0.5)  # a late second delivery would show now
        assert all(len(v) == 1 for v in delivery.succeeded.values())
        async with core.db.read() as s:
            states = dict(
                (await s.execute(select(Job.state, func.count()).group_by(Job.state))).tuples().all()
            )
        assert states == {"succeeded": 20}
        assert (await core.service.quota(ALICE, GUILD)).used_today == 20


async def test_unwritable_storage_stops_the_start_with_the_key(tmp_path):
    from bot.bootstrap import build_core
    from bot.settings import ConfigError
    from tests.core.helpers import config_for

    (tmp_path / "images").write_text("not a directory\n")
    with pytest.raises(ConfigError, match=r"\[storage\] dir: .*images is not writable"):
        async with build_core(config_for(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", tmp_path), {}):
            pass


async def _backend_pid(db: Database) -> int:
    async with db.read() as s:
        return int((await s.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def _terminate(url: str, pid: int) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_a_connection_idle_past_the_ping_threshold_is_pinged_and_replaced(pg_session_url, monkeypatch):
    """A pooled connection that sat idle (here: any, the threshold is 0) is pinged before use, so one
    whose server process is gone is replaced and the unit of work never sees it."""
    monkeypatch.setattr(db_module, "PING_IDLE_S", 0.0)
    db = Database(make_engine(pg_session_url, pool_size=1))
    try:
        pid = await _backend_pid(db)
        await _terminate(pg_session_url, pid)
        assert await _backend_pid(db) != pid
    finally:
        await db.close()


@pytest.mark.postgres
async def test_a_busy_connection_is_not_pinged_and_a_dead_one_costs_one_unit_of_work(
    pg_session_url, monkeypatch
):
    """Within the threshold a connection goes to work without a ping (three round trips saved per
    transaction); one that died meanwhile fails that unit of work as `unavailable`, as a connection
    lost mid-transaction does, and the next one gets a new connection."""
    monkeypatch.setattr(db_module, "PING_IDLE_S", 3600.0)
    db = Database(make_engine(pg_session_url, pool_size=1))
    pings = []
    real_ping = db.engine.dialect.do_ping
    monkeypatch.setattr(db.engine.dialect, "do_ping", lambda conn: pings.append(1) or real_ping(conn))
    try:
        pid = await _backend_pid(db)
        assert await _backend_pid(db) == pid and pings == []
        await _terminate(pg_session_url, pid)
        with pytest.raises(DatabaseError) as err:
            await _backend_pid(db)
        assert err.value.kind == "unavailable"
        assert await _backend_pid(db) != pid
        assert pings == []
    finally:
        await db.close()


async def test_a_fresh_sqlite_file_locked_by_another_writer_still_switches_to_wal(tmp_path):
    """Processes starting together on a fresh SQLite file: while one holds the write lock of the
    file still in rollback mode, another's switch to WAL gets "database is locked" at once (SQLite
    refuses to wait where waiting could deadlock). The switch is tried again until the lock goes,
    without blocking the event loop meanwhile."""
    import sqlite3

    path = tmp_path / "fresh.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (i INTEGER)")
    other.execute("BEGIN IMMEDIATE")  # the other process's write lock, file in rollback mode
    other.execute("INSERT INTO t VALUES (1)")
    engine = make_engine(f"sqlite+aiosqlite:///{path}", sqlite_busy_timeout_s=30)
    loop_ran = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, lambda: (loop_ran.set(), other.execute("COMMIT")))
    try:
        async with asyncio.timeout(20), engine.connect() as conn:
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
        assert mode == "wal" and loop_ran.is_set()  # the loop ran (and the lock went) meanwhile
    finally:
        await engine.dispose()
        other.close()
