"""Publications on SQLite and PostgreSQL: of several processes (each its own engine) claiming the
same new digest at once exactly one wins; the same digest again wins nothing; a new one wins once; a
released claim wins again."""

from __future__ import annotations

import asyncio

from bot.core.db import Database, make_engine
from bot.core.models import utcnow
from bot.core.publications import Publications
from bot.migrate import upgrade


async def test_exactly_one_claim_per_new_digest_across_processes(db_url):
    engines = [make_engine(db_url, pool_size=2) for _ in range(4)]
    try:
        await upgrade(engines[0])
        processes = [Publications(Database(engine), utcnow) for engine in engines]

        async def claim_all(digest: str) -> list[bool]:
            return list(
                await asyncio.gather(*(p.claim("discord:commands:1:global", digest) for p in processes))
            )

        assert sorted(await claim_all("a" * 64)) == [False, False, False, True]
        assert await claim_all("a" * 64) == [False] * 4  # a restart with the same tree
        assert sorted(await claim_all("b" * 64)) == [False, False, False, True]  # a changed tree
        assert await processes[0].claim("discord:commands:1:guild:5", "b" * 64)  # keys are separate
        await processes[1].release("discord:commands:1:global", "b" * 64)  # the publisher failed
        assert sorted(await claim_all("b" * 64)) == [False, False, False, True]
        await processes[1].release("discord:commands:1:global", "c" * 64)  # not the current: no-op
        assert await claim_all("b" * 64) == [False] * 4
    finally:
        for engine in engines:
            await engine.dispose()
