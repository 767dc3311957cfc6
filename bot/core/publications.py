"""Publications: what the bot last published to a platform under a key, so that a change is
published once however many processes start with it.

Discord's slash commands are one example: every process builds the same command tree, but syncing it
is a rate-limited API call that only needs to happen when the tree changed. Each process hashes its
tree and calls `claim(key, digest)`; a compare-and-set on one row makes exactly one caller per new
digest the publisher (an insert that loses to another's, or an update whose `digest <> new` no
longer holds once the winner committed, changes nothing). A publisher that then fails calls
`release`, so the next start tries again instead of believing the change is out.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from sqlalchemy import delete, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot.core.db import Database
from bot.core.models import Publication


class Publications:
    def __init__(self, db: Database, clock: Callable[[], dt.datetime]):
        self.db = db
        self.clock = clock

    async def claim(self, key: str, digest: str) -> bool:
        """True for exactly one caller per new `digest` of `key`: that caller publishes it. False
        when `digest` is what was published last (or another caller is publishing it now)."""
        now = self.clock()
        insert = pg_insert if self.db.is_postgres else sqlite_insert
        async with self.db.session() as s:
            added = await s.execute(
                insert(Publication)
                .values(key=key, digest=digest, updated_at=now)
                .on_conflict_do_nothing(index_elements=["key"])
            )
            if added.rowcount == 1:  # type: ignore[attr-defined]
                return True
            changed = await s.execute(
                update(Publication)
                .where(Publication.key == key, Publication.digest != digest)
                .values(digest=digest, updated_at=now)
            )
            return changed.rowcount == 1  # type: ignore[attr-defined]

    async def release(self, key: str, digest: str) -> None:
        """The claimed `digest` could not be published: forget it, so the next claim wins again."""
        async with self.db.session() as s:
            await s.execute(delete(Publication).where(Publication.key == key, Publication.digest == digest))
