"""Batch statements of constant text (`bot.core.bulk`): rows sent as one JSON parameter on
PostgreSQL come back as the plain INSERT stores them, and `one_of` selects the same rows as IN."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import Table, insert, select

from bot.core.bulk import from_rows, one_of, rows_param
from bot.core.db import Database, make_engine
from bot.core.models import Job, User
from bot.migrate import upgrade

JOBS = cast(Table, Job.__table__)
USERS = cast(Table, User.__table__)
NOW = dt.datetime(2026, 12, 2, 14, 30, 1, 250_000, tzinfo=dt.UTC)


def job_row(i: int, user_id: int) -> dict[str, Any]:
    return {
        "idempotency_key": f"bulk:{i}",
        "user_id": user_id,
        "platform": "discord",
        "guild_id": None if i % 2 else "g1",
        "channel_id": "c1",
        "kind": "imagine",
        "prompt": f'a "quoted" prompt ✨ {i}\nsecond line',
        "negative_prompt": "",
        "params": {"task": "txt2img", "width": 512, "strength": None, "private": bool(i % 2)},
        "seed": 2**62 + i,
        "seeds": [2**62 + i, 7],
        "state": "queued",
        "fair_round": i,
        "attempts": 0,
        # Another time zone: stored as the same instant in UTC.
        "created_at": NOW.astimezone(dt.timezone(dt.timedelta(hours=-5))),
        "delivery": {},
        "quota_period": NOW.date(),
        "quota_daily": 1,
        "quota_credits": 0,
        "refunded": False,
        "delivery_attempts": 0,
        "loras": [{"name": "x", "weight": 0.5}],
    }


async def test_rows_as_one_parameter_store_what_a_plain_insert_stores(db_url):
    db = Database(make_engine(db_url, pool_size=2))
    pg = db.is_postgres
    try:
        if not pg:
            await upgrade(db.engine)  # the PostgreSQL database is migrated once per session
        async with db.session() as s:
            user = {
                "platform": "discord", "platform_user_id": "bulk", "display_name": "B", "is_admin": False,
                "banned": False, "ban_reason": "", "bonus_credits": 0, "created_at": NOW, "updated_at": NOW,
            }  # fmt: skip
            user_id = (await s.execute(insert(USERS).returning(USERS.c.id), [user])).scalar_one()
            rows = [job_row(i, user_id) for i in range(3)]
            names = tuple(rows[0])
            statement = from_rows(insert(JOBS), JOBS, names, postgres=pg).returning(JOBS.c.id)
            ids = (await s.execute(statement, rows_param(rows, postgres=pg))).scalars().all()
            # The same rows the plain way, for comparison.
            plain = [{**row, "idempotency_key": row["idempotency_key"] + "p"} for row in rows]
            plain_ids = (await s.execute(insert(JOBS).returning(JOBS.c.id), plain)).scalars().all()
        assert len(ids) == 3
        async with db.read() as s:
            jobs = (
                await s.execute(select(Job).where(one_of(Job.id, ids + plain_ids, postgres=pg)))
            ).scalars()
            by_key = {job.idempotency_key: job for job in jobs}
        assert len(by_key) == 6
        columns = [c for c in names if c != "idempotency_key"]
        for row in rows:
            sent, plainly = by_key[row["idempotency_key"]], by_key[row["idempotency_key"] + "p"]
            assert {c: getattr(sent, c) for c in columns} == {c: getattr(plainly, c) for c in columns}
            assert sent.created_at == NOW and sent.created_at.tzinfo is not None
            assert sent.params == row["params"] and sent.seeds == row["seeds"]
            assert sent.guild_id == row["guild_id"]  # None stays NULL
            assert sent.delivered_at is None and sent.delivery_attempts == 0  # left out: defaults
    finally:
        await db.close()


def test_statement_text_does_not_depend_on_the_batch_size():
    """On PostgreSQL a new text is a new prepared statement (a round trip): the text of 1 value or
    row and of 300 is the same."""
    from sqlalchemy.dialects import postgresql

    def sql(n: int) -> str:
        query = select(Job.id).where(one_of(Job.idempotency_key, [f"k{i}" for i in range(n)], postgres=True))
        return str(query.compile(dialect=postgresql.asyncpg.dialect()))

    assert sql(1) == sql(300)
    assert "ANY" in sql(1)
    names = ("idempotency_key", "user_id")
    statement = from_rows(insert(JOBS), JOBS, names, postgres=True)
    text = str(statement.compile(dialect=postgresql.asyncpg.dialect()))
    assert "jsonb_populate_recordset" in text
    assert rows_param([{"a": NOW}], postgres=True) == {"rows": '[{"a":"2026-12-02T14:30:01.250000+00:00"}]'}
