"""Engine and sessions for SQLite (aiosqlite) and PostgreSQL (asyncpg).

SQLite serialises writers anyway; we make every write transaction `BEGIN IMMEDIATE` so that a
read-then-write (quota check, then charge) cannot interleave with another one: the quota is exact
without relying on SQLite's snapshot errors. Reads that must not take the write lock use
`Database.read()`. On PostgreSQL the service locks the rows it changes (`SELECT ... FOR UPDATE`)
and the dispatcher claims with `FOR UPDATE SKIP LOCKED`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Result, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.util import await_only

from bot.core import fastjson
from bot.core.api import DatabaseError

log = logging.getLogger("bot.core.db")

# What a unit of work may raise from the database or its driver. UnicodeError: a driver that cannot
# encode a value (the core's checks keep such values out; this is the net under them). OSError: a
# connection refused or reset before SQLAlchemy could wrap it.
_DRIVER_ERRORS = (sa_exc.SQLAlchemyError, UnicodeError, OSError)

# Pooled connections idle this long are pinged before use (`_install_idle_ping`): a connection
# idle for a second may have met a server restart or an idle timeout unnoticed; one in use
# throughout would have failed its last statement instead. Under load connections cycle far faster,
# so the ping costs nothing where round trips count.
PING_IDLE_S = 1.0
_IDLE_SINCE = "imagine_idle_since"


def as_database_error(error: BaseException) -> DatabaseError:
    """The core's error for a database failure, logged here once with its cause."""
    if isinstance(error, sa_exc.IntegrityError):
        return DatabaseError(
            "Another request changed the same data at the same moment; please try again.", "conflict"
        )
    unavailable = isinstance(
        error,
        (
            sa_exc.OperationalError,
            sa_exc.InterfaceError,
            sa_exc.TimeoutError,
            sa_exc.DisconnectionError,
            OSError,
        ),
    ) or bool(getattr(error, "connection_invalidated", False))
    if unavailable:
        # A restart or a network blip: one line, not a traceback per request.
        log.warning("database unavailable: %s: %s", type(error).__name__, str(error).splitlines()[0][:300])
        return DatabaseError(
            "The bot's database is not answering right now; please try again in a minute.", "unavailable"
        )
    log.error("database error", exc_info=error)
    return DatabaseError(
        "The bot could not read or save this in its database (the admins can see why in the log)."
    )


def make_engine(
    url: str, *, pool_size: int = 10, echo: bool = False, sqlite_busy_timeout_s: float = 30.0
) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url,
            echo=echo,
            connect_args={"timeout": sqlite_busy_timeout_s},
            **_sqlite_module(parsed.get_driver_name()),
            pool_size=pool_size,
            # SQLite connections are cheap; overflow lets bursts queue in SQLite's busy handler
            # rather than in the pool.
            max_overflow=pool_size,
            # The connection used last first: its statement cache is warm (see below).
            pool_use_lifo=True,
            json_serializer=fastjson.dumps,
        )
        _install_sqlite_hooks(engine, busy_timeout_s=sqlite_busy_timeout_s)
        return engine
    engine = create_async_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        # A fixed pool: bursts (200 concurrent submitters in the bench) wait for a connection
        # rather than opening more; PostgreSQL's default max_connections is 100 for every process
        # together.
        max_overflow=0,
        pool_timeout=60,
        # The connection used last first. asyncpg prepares each statement once per connection (a
        # round trip, and PostgreSQL parses and plans it); first-in-first-out handed every burst's
        # batches the coldest connection, so the first ten batches after a start or a quiet spell
        # each prepared every statement again (a burst's first wave took 1.6x the later ones).
        pool_use_lifo=True,
        json_serializer=fastjson.dumps,
    )
    _install_idle_ping(engine)
    if parsed.get_backend_name() == "postgresql":
        _install_postgres_hooks(engine)
    return engine


_stock_sqlite_warned = False


def _sqlite_module(driver: str) -> dict[str, Any]:
    """`module=`: SQLAlchemy's aiosqlite DBAPI adapter with one hop to aiosqlite's thread per
    statement (`bot.core.sqlite_driver`), for sqlite+aiosqlite only. Passed as the engine's DBAPI
    module (a documented `create_engine` argument) rather than as a dialect of our own: the dialect
    stays SQLAlchemy's (its name, statement cache, pool choice, `is_disconnect`), URLs are
    unchanged, and nothing is registered process-wide. Where the installed aiosqlite or SQLAlchemy
    lacks the private attributes it uses, the stock adapter, with a warning."""
    global _stock_sqlite_warned
    if driver != "aiosqlite":
        return {}
    try:
        from bot.core import sqlite_driver
    except ImportError as e:
        if not _stock_sqlite_warned:
            _stock_sqlite_warned = True
            log.warning("SQLite: SQLAlchemy's stock aiosqlite adapter (four hops per statement): %s", e)
        return {}
    return {"module": sqlite_driver.dbapi()}


def _install_idle_ping(engine: AsyncEngine) -> None:
    """Ping a pooled connection before use only when it sat idle for `PING_IDLE_S` (the pool's own
    `pool_pre_ping` pings at every checkout; asyncpg's ping is BEGIN, a statement and ROLLBACK, so
    a one-statement transaction took six round trips instead of three). A connection that broke
    while busy (the server restarted within the last second) fails its unit of work as a broken
    connection does mid-transaction: the pool is invalidated and the caller's retry, or the user's,
    gets a new one."""

    @event.listens_for(engine.sync_engine.pool, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine.sync_engine.pool, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop(_IDLE_SINCE, None)  # None: a new connection
        if idle_since is None or time.monotonic() - idle_since < PING_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as e:
            if not engine.dialect.is_disconnect(cast(Any, e), dbapi_connection, None):
                raise
            alive = False
        if not alive:
            # As pool_pre_ping does: the server may have restarted, so every older connection goes.
            raise sa_exc.InvalidatePoolError("pooled connection failed its ping")


def _install_postgres_hooks(engine: AsyncEngine) -> None:
    # asyncpg prepares every statement, and PostgreSQL plans a prepared statement's sixth run
    # without its parameters (a generic plan), kept while it looks no worse. The batches' statements
    # take their values as arrays (`bot.core.bulk`), whose size and content a generic plan cannot
    # see: on a table whose statistics are young it chose `Seq Scan on jobs` for the idempotency
    # keys and a scan of every queued job for the users' rounds, and the sixth batch of a run took
    # 2-3x as long. Custom plans cost a plan per statement (tens of microseconds), what a statement
    # of a new text, as every batch's was before, costs anyway. A SET rather than a startup
    # parameter: poolers (PgBouncer) refuse unknown startup parameters.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        try:
            dbapi_connection.run_async(lambda conn: conn.execute("SET plan_cache_mode = force_custom_plan"))
        except Exception as e:
            # The driver's own error (not wrapped here): a connection that dies while it is set up
            # is a database unavailable, as anywhere else.
            raise sa_exc.DisconnectionError(f"a new connection failed while set up: {e!r}") from e


def _install_sqlite_hooks(engine: AsyncEngine, *, busy_timeout_s: float) -> None:
    # The documented recipe for taking over pysqlite's transaction handling (it otherwise emits
    # BEGIN lazily and DEFERRED), so that we choose IMMEDIATE per transaction.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers never block the writer; NORMAL sync is durable across process crashes
        # (only an OS crash may lose the last commits), which is the failure we design for.
        _journal_mode_wal(cursor, within_s=busy_timeout_s)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _journal_mode_wal(cursor: Any, *, within_s: float) -> None:
    """Switch a new SQLite file to WAL (a no-op once it is: the mode is kept in the file).

    The switch upgrades the connection's shared lock to an exclusive one. While another connection
    holds the write lock of a file still in rollback mode (processes starting together on a fresh
    file, one of them migrating it), SQLite answers "database is locked" at once instead of
    waiting in the busy handler, since waiting could deadlock. So it is tried again, for up to the
    busy timeout, sleeping on the event loop (this runs in SQLAlchemy's greenlet, where
    `await_only` awaits) rather than blocking it."""
    deadline = time.monotonic() + within_s
    delay = 0.01
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as e:  # the driver's OperationalError, through SQLAlchemy's adapter
            if "locked" not in str(e) or time.monotonic() + delay > deadline:
                raise
        await_only(asyncio.sleep(delay))
        delay = min(delay * 2, 0.25)


T = TypeVar("T")


def rows_matched(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched. `AsyncSession.execute` is typed as returning `Result`;
    for those statements it is a `CursorResult`, which has the count."""
    assert isinstance(result, CursorResult), f"not the result of an UPDATE or DELETE: {result!r}"
    return result.rowcount


async def retry_unavailable(op: Callable[[], Awaitable[T]], *, within_s: float, what: str) -> T:
    """Run `op` (one idempotent unit of work) again while the database is unavailable, for up to
    `within_s`: a write that records finished work (a result, a delivery) is worth waiting a moment
    for, where giving up would leave a claim to expire and the work to be done twice."""
    delay = 0.05
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await op()
        except DatabaseError as e:
            if e.kind != "unavailable" or time.monotonic() + delay > deadline:
                raise
        log.info("%s: database unavailable; trying again in %.2f s", what, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


@asynccontextmanager
async def _transaction(maker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session in one transaction: committed when the body ends, rolled back when it raises.
    Ending it (commit or rollback, and the connection's return to the pool) is not cut short by a
    cancellation: the caller's cancellation comes after it. A return cut short mid-way (a task
    cancelled at shutdown, or by a timeout, while aiosqlite rolls the pooled connection back)
    leaves the connection in an unknown state and makes SQLAlchemy's pool log "Exception during
    reset or similar" at ERROR."""
    session = maker()
    try:
        await session.begin()
        yield session
    except BaseException:
        await _uninterrupted(_end(session, commit=False))
        raise
    await _uninterrupted(_end(session, commit=True))


async def _end(session: AsyncSession, *, commit: bool) -> None:
    try:
        if commit:
            await session.commit()
        else:
            await session.rollback()
    finally:
        await session.close()


# How long a cancelled caller still waits for its transaction's end (a commit or rollback is a
# round trip or two): long enough for any healthy database, short enough that a stop while the
# database hangs (asyncpg has no statement timeout here) still ends.
END_WITHIN_S = 10.0


async def _uninterrupted(step: Awaitable[None]) -> None:
    """Await `step` to its end even when the caller is cancelled meanwhile (for up to
    END_WITHIN_S after that), then re-raise that cancellation."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
        return
    except asyncio.CancelledError as e:
        if task.cancelled():
            raise  # the step itself was cancelled, not (only) its caller
        cancelled = e  # the caller was: the step goes on, and the cancellation comes after it
    deadline = asyncio.get_running_loop().time() + END_WITHIN_S
    while not task.done():
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            log.warning(
                "a transaction's end outlasted %.0f s after its caller was cancelled; cut off", END_WITHIN_S
            )
            task.cancel()
            break
        with contextlib.suppress(asyncio.CancelledError):  # cancelled again: still the same stop
            await asyncio.wait({task}, timeout=remaining)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: the caller was cancelled, and hears of that instead
    raise cancelled


class Database:
    """The engine plus two session factories: `session()` for units of work that write, `read()` for
    read-only ones (on SQLite these do not take the write lock)."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.dialect = engine.dialect.name
        self._write = async_sessionmaker(engine, expire_on_commit=False)
        read_engine = engine.execution_options(sqlite_begin="DEFERRED") if self.is_sqlite else engine
        self._read = async_sessionmaker(read_engine, expire_on_commit=False)
        self._sqlite_writer = asyncio.Lock() if self.is_sqlite else None
        # Units of work wait here, first come first served (asyncio.Semaphore is FIFO-fair), before
        # taking a pooled connection. The pool's own queue lets newcomers overtake waiters: with
        # 200 concurrent submitters on PostgreSQL the early ones waited 3-4x the median.
        # Sessions are never nested, so this cannot deadlock.
        size = engine.pool.size() if hasattr(engine.pool, "size") else 10
        self._gate = asyncio.Semaphore(max(1, size))

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """One transaction: committed on success, rolled back on error. A failure of the database
        or its driver comes out as `DatabaseError`; the body's own exceptions pass unchanged."""
        try:
            if self._sqlite_writer is not None:
                # SQLite has one writer at a time. Queue this process's writers here rather than in
                # SQLite's busy handler, whose sleeps grow while the lock sits free (throughput fell
                # tenfold with 200 concurrent submitters). Other processes still meet the busy handler.
                async with self._sqlite_writer, self._gate, _transaction(self._write) as s:
                    yield s
                return
            async with self._gate, _transaction(self._write) as s:
                yield s
        except _DRIVER_ERRORS as e:
            raise as_database_error(e) from e

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self._gate, _transaction(self._read) as s:
                yield s
        except _DRIVER_ERRORS as e:
            raise as_database_error(e) from e

    async def close(self) -> None:
        await self.engine.dispose()
