"""`bot.core.sqlite_driver`: one hop to aiosqlite's thread per statement, on a real SQLite file.

The hops are counted at `aiosqlite.Connection._execute`, which every call to the thread goes
through (the stock adapter's cursor, execute, fetchall and close, and commit and rollback).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import bot.core
from bot.core import db as db_module
from bot.core import sqlite_driver
from bot.core.api import DatabaseError
from bot.core.db import Database, make_engine

SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, n INTEGER NOT NULL DEFAULT 0)"


class Hops:
    def __init__(self) -> None:
        self.count = 0


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hops]:
    counter = Hops()
    execute = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        counter.count += 1
        return await execute(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    yield counter


@pytest.fixture(params=["one_hop", "stock"])
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AsyncEngine]:
    """make_engine's SQLite engine; "stock": the same with SQLAlchemy's own adapter, which the
    behaviour tests (not the hop counts) run against too, to show the results and errors alike."""
    if request.param == "stock":
        monkeypatch.setattr(db_module, "_sqlite_module", lambda driver: {})
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'driver.db'}", pool_size=1)
    assert isinstance(engine.dialect.dbapi, sqlite_driver.OneHopDBAPI) == (request.param == "one_hop")
    async with engine.begin() as conn:
        await conn.exec_driver_sql(SCHEMA)
    yield engine
    await engine.dispose()


def test_make_engine_uses_the_one_hop_adapter_with_the_installed_versions(tmp_path: Path) -> None:
    """Fails where the pinned aiosqlite/SQLAlchemy lack the private attributes (db.py then falls
    back to the stock adapter with a warning)."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    assert isinstance(engine.dialect.dbapi, sqlite_driver.OneHopDBAPI)
    assert engine.dialect.name == "sqlite" and engine.dialect.driver == "aiosqlite"


def one_hop(engine: AsyncEngine) -> bool:
    return isinstance(engine.dialect.dbapi, sqlite_driver.OneHopDBAPI)


async def test_one_hop_per_statement(engine: AsyncEngine, hops: Hops) -> None:
    """Stock: cursor, execute, fetchall (with rows) and close per statement."""
    stock = not one_hop(engine)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))  # the connection is checked out and warm
        hops.count = 0
        rows = (await conn.execute(text("SELECT id, name FROM t ORDER BY id"))).all()
        assert rows == [] and hops.count == (4 if stock else 1)

        hops.count = 0
        result = await conn.execute(
            text("INSERT INTO t (name, n) VALUES ('a', 1), ('b', 2) RETURNING id, name")
        )
        assert [tuple(r) for r in result] == [(1, "a"), (2, "b")] and hops.count == (4 if stock else 1)

        hops.count = 0
        updated = await conn.execute(text("UPDATE t SET n = n + 1"))
        assert updated.rowcount == 2 and hops.count == (3 if stock else 1)

        hops.count = 0
        await conn.commit()
        assert hops.count == 1


async def test_rows_rowcount_lastrowid_and_executemany(engine: AsyncEngine, hops: Hops) -> None:
    async with engine.begin() as conn:
        inserted = await conn.exec_driver_sql("INSERT INTO t (name) VALUES (?)", ("x",))
        assert inserted.rowcount == 1 and inserted.lastrowid == 1

        hops.count = 0
        many = await conn.exec_driver_sql("INSERT INTO t (name, n) VALUES (?, ?)", [("y", 5), ("z", 6)])
        assert many.rowcount == 2 and hops.count == (1 if one_hop(engine) else 3)

        result = await conn.execute(text("SELECT name, n FROM t ORDER BY id"))
        assert result.keys() == ["name", "n"]
        assert result.fetchone() == ("x", 0)
        assert result.fetchmany(1) == [("y", 5)]
        assert result.fetchall() == [("z", 6)]
        assert result.fetchone() is None

        def dbapi_cursor(sync_conn: Any) -> None:
            cursor = sync_conn.connection.dbapi_connection.cursor()
            cursor.execute("SELECT name FROM t WHERE n > ? ORDER BY id", (0,))
            assert [d[0] for d in cursor.description] == ["name"] and cursor.rowcount == -1
            assert list(cursor) == [("y",), ("z",)] and cursor.fetchall() == []
            cursor.execute("DELETE FROM t WHERE n = 6")
            assert cursor.description is None and cursor.rowcount == 1
            cursor.close()

        await conn.run_sync(dbapi_cursor)

        deleted = await conn.execute(text("DELETE FROM t WHERE n >= 5 RETURNING name"))
        assert deleted.scalars().all() == ["y"]


async def test_a_unique_violation_is_an_integrity_error_and_the_connection_goes_on(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO t (name) VALUES ('a')"))
        with pytest.raises(sa_exc.IntegrityError, match="UNIQUE constraint failed"):
            await conn.execute(text("INSERT INTO t (name) VALUES ('a') RETURNING id"))
        with pytest.raises(sa_exc.IntegrityError):
            await conn.exec_driver_sql("INSERT INTO t (name) VALUES (?)", [("b",), ("a",)])
        assert not conn.invalidated
        await conn.commit()
        names = (await conn.execute(text("SELECT name FROM t ORDER BY id"))).scalars().all()
        assert names == ["a", "b"]  # as sqlite3's executemany: the rows before the failing one stay


async def test_a_syntax_error_is_an_operational_error(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        with pytest.raises(sa_exc.OperationalError, match="syntax error"):
            await conn.execute(text("SELEC 1"))
        with pytest.raises(sa_exc.OperationalError, match="no such table"):
            await conn.execute(text("SELECT * FROM nowhere"))
        assert (await conn.execute(text("SELECT 2"))).scalar_one() == 2


async def test_a_closed_connection_is_a_disconnect(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        await raw.driver_connection.close()  # type: ignore[union-attr]
        with pytest.raises(sa_exc.OperationalError) as caught:
            await conn.execute(text("SELECT 1"))
        assert caught.value.connection_invalidated


async def test_sessions_begin_immediate_commit_and_roll_back(engine: AsyncEngine, hops: Hops) -> None:
    db = Database(engine)
    async with db.session() as s:
        await s.execute(text("INSERT INTO t (name) VALUES ('kept')"))
    hops.count = 0
    async with db.session() as s:
        await s.execute(text("INSERT INTO t (name) VALUES ('kept too')"))
    # BEGIN IMMEDIATE, the INSERT, COMMIT; no rollback at the pool's reset, with nothing open
    # (stock: cursor, execute, close twice, COMMIT and the pool's ROLLBACK)
    assert hops.count == (3 if one_hop(engine) else 8)

    hops.count = 0
    with pytest.raises(RuntimeError):
        async with db.session() as s:
            await s.execute(text("INSERT INTO t (name) VALUES ('gone')"))
            raise RuntimeError("the body fails")
    # BEGIN IMMEDIATE, the INSERT, ROLLBACK (stock: the pool's ROLLBACK again)
    assert hops.count == (3 if one_hop(engine) else 8)

    with pytest.raises(DatabaseError) as conflict:
        async with db.session() as s:
            await s.execute(text("INSERT INTO t (name) VALUES ('gone too')"))
            await s.execute(text("INSERT INTO t (name) VALUES ('kept')"))
    assert conflict.value.kind == "conflict"

    async with db.read() as s:
        names = (await s.execute(text("SELECT name FROM t ORDER BY id"))).scalars().all()
    assert names == ["kept", "kept too"]


async def test_a_cancelled_begin_leaves_no_transaction_behind(tmp_path: Path) -> None:
    """A BEGIN IMMEDIATE waiting in SQLite's busy handler when its caller is cancelled still runs
    on aiosqlite's thread: what ends it (SQLAlchemy closes the connection; a rollback would do)
    must come after it, and no pooled connection may keep the write lock."""
    import sqlite3

    path = tmp_path / "locked.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}", pool_size=1, sqlite_busy_timeout_s=5)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(SCHEMA)
    db = Database(engine)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")

        async def write() -> None:
            async with db.session() as s:
                await s.execute(text("INSERT INTO t (name) VALUES ('cancelled')"))

        task = asyncio.create_task(write())
        await asyncio.sleep(0.3)  # waiting in the busy handler
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        other.execute("COMMIT")  # the BEGIN IMMEDIATE on aiosqlite's thread goes through now
        await asyncio.sleep(0.3)

        async with db.session() as s:
            await s.execute(text("INSERT INTO t (name) VALUES ('after')"))
        other.execute("BEGIN IMMEDIATE")  # no pooled connection holds the write lock
        other.execute("ROLLBACK")
        assert [r[0] for r in other.execute("SELECT name FROM t")] == ["after"]
    finally:
        other.close()
        await engine.dispose()


async def test_without_the_private_attributes_the_stock_adapter_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(aiosqlite.Connection, "_execute")
    monkeypatch.delitem(sys.modules, "bot.core.sqlite_driver")
    monkeypatch.delattr(bot.core, "sqlite_driver")  # as before its first import
    monkeypatch.setattr(db_module, "_stock_sqlite_warned", False)
    with pytest.raises(ImportError, match="lacks _execute"):
        importlib.import_module("bot.core.sqlite_driver")
    monkeypatch.delitem(sys.modules, "bot.core.sqlite_driver", raising=False)
    with caplog.at_level(logging.WARNING, logger="bot.core.db"):
        engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'stock.db'}")
    assert not isinstance(engine.dialect.dbapi, sqlite_driver.OneHopDBAPI)
    assert "stock aiosqlite adapter" in caplog.text and "lacks _execute" in caplog.text
    await engine.dispose()
