"""SQLAlchemy's aiosqlite adapter, with one hop to aiosqlite's thread per statement instead of four.

aiosqlite runs every call on the connection's own thread. SQLAlchemy's adapter
(`sqlalchemy.dialects.sqlite.aiosqlite` over `sqlalchemy.connectors.asyncio`) makes four calls per
statement: `connection.cursor()`, `cursor.execute`, `cursor.fetchall` (when it returns rows) and
`cursor.close`. Each is a future, a put on the thread's queue, a thread wake-up, a
`call_soon_threadsafe` back and an event-loop wake-up: on a busy event loop, most of a short
statement's time. `OneHopCursor.execute` sends one plain function instead, which opens a sqlite3
cursor, executes, reads the description, fetches every row when there is one, reads `rowcount`
and `lastrowid` and closes the cursor; the cursor then serves description, rowcount, lastrowid,
fetchone/fetchmany/fetchall and iteration from what came back. `executemany` is one hop too;
commit and rollback were one hop already, and are none where no transaction is open (the pool's
rollback of each connection returned after a commit: one hop per unit of work). Server-side cursors (`stream()`, which the core does not
use) stay SQLAlchemy's own.

Errors come back through the same path as before (`_handle_exception` of SQLAlchemy's adapter),
so SQLAlchemy raises the same IntegrityError, OperationalError, ... and a closed connection still
counts as a disconnect.

This leans on private attributes, checked by `_check_private_api` when this module is imported
(an ImportError naming what is missing; `bot.core.db` then logs a warning and uses the stock
adapter): aiosqlite's `Connection._execute(fn, *args)` (runs `fn` on the connection's thread) and
`Connection._conn` (its `sqlite3.Connection`), the pins `aiosqlite>=0.22,<0.23`; SQLAlchemy's
`AsyncAdapt_aiosqlite_dbapi`, `AsyncAdapt_aiosqlite_connection` (`_cursor_cls`, `_connection`,
`_handle_exception`) and `AsyncAdapt_dbapi_cursor` (`_rows`, `_adapt_connection`,
`_soft_closed_memoized`, `_async_soft_close`), which SQLAlchemy 2.1 has (pin `<2.2`).
`tests/core/test_sqlite_driver.py` fails when the installed versions fall back.
"""

from __future__ import annotations

import collections
import sqlite3
from typing import Any, cast

import aiosqlite
from sqlalchemy.connectors.asyncio import AsyncAdapt_dbapi_connection, AsyncAdapt_dbapi_cursor
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util import EMPTY_DICT
from sqlalchemy.util.concurrency import await_


def _check_private_api() -> None:
    missing = [
        name
        for owner, name in (
            (aiosqlite.Connection, "_execute"),
            (aiosqlite.Connection, "_conn"),
            (AsyncAdapt_aiosqlite_connection, "_cursor_cls"),
            (AsyncAdapt_aiosqlite_connection, "_handle_exception"),
            (AsyncAdapt_dbapi_cursor, "_async_soft_close"),
        )
        if not hasattr(owner, name)
    ] + [
        f"AsyncAdapt_dbapi_cursor.{slot}"
        for slot in ("_adapt_connection", "_connection", "_rows", "_soft_closed_memoized")
        if slot not in getattr(AsyncAdapt_dbapi_cursor, "__slots__", ())
    ]
    if missing:
        raise ImportError(
            "bot.core.sqlite_driver: the installed aiosqlite "
            f"{getattr(aiosqlite, '__version__', '?')} or SQLAlchemy lacks {', '.join(missing)}"
        )


_check_private_api()

# What one hop brings back: description, rows (None without a description), rowcount, lastrowid.
_Outcome = tuple[Any, list[Any] | None, int, int | None]


def _execute_on_thread(conn: sqlite3.Connection, operation: str, parameters: Any) -> _Outcome:
    """On aiosqlite's thread: the whole statement, from cursor to close."""
    cursor = conn.cursor()
    try:
        if parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else None
        return description, rows, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


def _executemany_on_thread(conn: sqlite3.Connection, operation: str, seq_of_parameters: Any) -> _Outcome:
    cursor = conn.cursor()
    try:
        cursor.executemany(operation, seq_of_parameters)
        return cursor.description, None, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


def _on_thread(
    fn: Any, adapt: OneHopConnection, sent: int, conn: sqlite3.Connection, operation: str, parameters: Any
) -> _Outcome:
    try:
        return fn(conn, operation, parameters)  # type: ignore[no-any-return]
    finally:
        adapt._statements_done = sent


class OneHopCursor(AsyncAdapt_aiosqlite_cursor):
    """A client-side cursor that keeps no sqlite3 cursor: each execute is one function on
    aiosqlite's thread, and the results are kept here."""

    __slots__ = ("_description", "_rowcount", "_lastrowid", "_arraysize")

    def __init__(self, adapt_connection: AsyncAdapt_dbapi_connection):
        # Not the parent's __init__: it opens an aiosqlite cursor (a hop).
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None
        self._arraysize = 1  # sqlite3's default

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> Any:
        return self._lastrowid

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    def _run(self, fn: Any, operation: Any, parameters: Any) -> None:
        # No `_execute_mutex` as the stock cursor takes: it kept its execute and fetchall together,
        # and here they are one function, which aiosqlite's thread runs whole.
        adapt = cast(OneHopConnection, self._adapt_connection)
        try:
            # `_conn` (ValueError "no active connection" once closed) and `_execute` (ValueError
            # "Connection closed") fail as the stock adapter's calls do, and are translated alike.
            conn = self._connection._conn
            adapt._statements_sent += 1
            outcome = await_(
                self._connection._execute(
                    _on_thread, fn, adapt, adapt._statements_sent, conn, operation, parameters
                )
            )
        except Exception as error:
            self._adapt_connection._handle_exception(error)
        self._description, rows, self._rowcount, self._lastrowid = outcome
        self._rows = collections.deque(rows) if rows else collections.deque()

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        self._run(_execute_on_thread, operation, parameters)
        return self

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        self._run(_executemany_on_thread, operation, seq_of_parameters)
        return self

    async def _async_soft_close(self) -> None:
        return  # nothing is open on aiosqlite's thread: the rows stay here

    def close(self) -> None:
        self._rows.clear()

    def nextset(self) -> None:
        return None  # sqlite3 has one result set per statement

    def setinputsizes(self, *inputsizes: Any) -> None:
        return None  # a no-op in sqlite3 as well


class OneHopConnection(AsyncAdapt_aiosqlite_connection):
    # The statements sent to aiosqlite's thread (written by the event loop's thread only) and the
    # last one that ended there (written by aiosqlite's thread only).
    __slots__ = ("_statements_sent", "_statements_done")
    _cursor_cls = OneHopCursor

    def __init__(self, dbapi: Any, connection: Any):
        super().__init__(dbapi, connection)
        self._statements_sent = 0
        self._statements_done = 0

    def _idle(self) -> bool:
        """No transaction open: sqlite3's commit and rollback would do nothing (they check the
        same flag, `sqlite3_get_autocommit`), so they need no hop. Read from the event loop's
        thread, which sqlite3 allows for `in_transaction`, and only while none of this
        connection's statements is still running or waiting on aiosqlite's thread: one whose
        caller was cancelled (a BEGIN IMMEDIATE in SQLite's busy handler) may yet open a
        transaction, and only a rollback queued behind it ends that. (SQLAlchemy closes a
        connection whose statement was cancelled, a close queued behind it as well; this keeps
        any other path as safe as the stock adapter's.)"""
        if self._statements_done != self._statements_sent:
            return False
        conn = self._connection._connection
        if conn is None:
            return False  # closed: the stock path (which skips it as well)
        try:
            return not conn.in_transaction
        except sqlite3.Error:
            return False  # the stock path, and its error

    def rollback(self) -> None:
        # The pool's reset of every connection returned after a commit is such a rollback: one
        # hop per unit of work saved.
        if not self._idle():
            super().rollback()

    def commit(self) -> None:
        if not self._idle():
            super().commit()


class OneHopDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """SQLAlchemy's aiosqlite DBAPI module whose connections use `OneHopCursor`: passed to
    `create_async_engine(..., module=...)` (see `bot.core.db.make_engine`)."""

    def connect(self, *arg: Any, **kw: Any) -> OneHopConnection:
        # The stock connect (the connector, the daemon thread), re-wrapped: its adapter object
        # holds nothing else.
        stock = super().connect(*arg, **kw)
        return OneHopConnection(self, stock._connection)


def dbapi() -> OneHopDBAPI:
    """A fresh module object per engine, as the stock dialect's `import_dbapi` makes."""
    return OneHopDBAPI(aiosqlite, sqlite3)
