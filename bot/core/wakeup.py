"""Waking a dispatcher when another process queues a job: PostgreSQL's LISTEN/NOTIFY.

A submission (and a claim handed back to the queue) runs `pg_notify('imagine_jobs', payload)`
inside its transaction (the payload says whether a storm of submissions is under way,
`bot.core.submit_activity`), so the notification goes out when it commits and never for one rolled back. Each
dispatcher holds one asyncpg connection of its own (outside the pool, which it would otherwise
hold forever) that LISTENs on the channel and sets the dispatcher's wake event. A listener that
loses its connection reconnects at the dispatcher's next tick; until then the poll
(`[bot] poll_interval_s`) finds the work, so a lost notification costs latency, never a job.
SQLite has no such channel: a dispatcher there is woken by its own process and polls for others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy.engine import URL

from bot.core.fair_queue import JOBS_CHANNEL

log = logging.getLogger("bot.core.wakeup")

# A failed connection is tried again after this long: often enough to get wake-ups back soon after
# a database restart, rarely enough not to add load to a database that is struggling.
RECONNECT_S = 5.0


class JobListener:
    def __init__(self, url: URL, on_notify: Callable[[str], None]):
        # asyncpg takes a libpq-style URL: the SQLAlchemy driver suffix goes.
        self.dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.on_notify = on_notify
        self._conn: asyncpg.Connection | None = None
        self._last_try = -RECONNECT_S

    @property
    def listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def ensure(self) -> bool:
        """Listen if not listening yet (or any more); True when listening. Never raises: without
        the listener the dispatcher still polls."""
        if self.listening:
            return True
        now = time.monotonic()
        if now - self._last_try < RECONNECT_S:
            return False
        self._last_try = now
        await self.close()
        try:
            conn = await asyncpg.connect(self.dsn, timeout=10)
            await conn.add_listener(JOBS_CHANNEL, self._notified)
        except Exception as e:  # noqa: BLE001 - any failure leaves us polling, which is safe
            log.warning("cannot LISTEN for new jobs (%s: %s); polling only", type(e).__name__, e)
            return False
        self._conn = conn
        # A notification sent while we were not listening is lost: look at the queue now.
        self.on_notify("")
        log.info("listening for new jobs on channel %s", JOBS_CHANNEL)
        return True

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.on_notify(payload)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=5)
            except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is gone
                conn.terminate()
