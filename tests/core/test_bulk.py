"""Batch statements (`bot.core.bulk`): rows sent as one JSON parameter on PostgreSQL, or as the
multi-row INSERT written by `execute_rows` on SQLite, come back as SQLAlchemy's plain INSERT stores
them, and `one_of` (one parameter on both databases) selects the same rows as IN."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import Table, case, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot.core import bulk
from bot.core.bulk import execute_rows, from_rows, one_of, rows_param
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
            ids = [row.id for row in await execute_rows(s, statement, rows)]
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
    from sqlalchemy.dialects import sqlite

    def sqlite_sql(n: int) -> str:
        query = select(Job.id).where(one_of(Job.idempotency_key, [f"k{i}" for i in range(n)], postgres=False))
        return str(query.compile(dialect=sqlite.dialect()))

    assert sqlite_sql(1) == sqlite_sql(300) and "json_each" in sqlite_sql(1)
    names = ("idempotency_key", "user_id")
    statement = from_rows(insert(JOBS), JOBS, names, postgres=True)
    text = str(statement.compile(dialect=postgresql.asyncpg.dialect()))
    assert "json_populate_recordset" in text
    assert rows_param([{"a": NOW}], postgres=True) == {"rows": '[{"a":"2026-12-02T14:30:01.250000+00:00"}]'}


async def migrated(db_url: str) -> Database:
    db = Database(make_engine(db_url, pool_size=2))
    if not db.is_postgres:
        await upgrade(db.engine)  # the PostgreSQL database is migrated once per session
    return db


def user_row(name: str, display: str, *, admin: bool = False) -> dict[str, Any]:
    return {
        "platform": "discord", "platform_user_id": name, "display_name": display, "is_admin": admin,
        "banned": False, "ban_reason": "", "bonus_credits": 0, "created_at": NOW, "updated_at": NOW,
    }  # fmt: skip


async def test_an_upsert_with_values_of_its_own_returns_converted_rows(db_url):
    """The users' upsert of a submit batch: a bound value after the rows (the "" of the CASE) and
    RETURNING values converted by their types (a bool, not SQLite's 0/1)."""
    db = await migrated(db_url)
    pg = db.is_postgres
    names = tuple(user_row("x", "x"))
    values = from_rows((pg_insert if pg else sqlite_insert)(USERS), USERS, names, postgres=pg)
    upsert = values.on_conflict_do_update(
        index_elements=["platform", "platform_user_id"],
        set_={
            "display_name": case(
                (values.excluded.display_name == "", USERS.c.display_name), else_=values.excluded.display_name
            ),
            "is_admin": values.excluded.is_admin,
        },
    ).returning(
        USERS.c.id, USERS.c.platform_user_id, USERS.c.display_name, USERS.c.is_admin, USERS.c.created_at
    )
    try:
        async with db.session() as s:
            first = await execute_rows(s, upsert, [user_row("u1", "Ann"), user_row("u2", "Bob", admin=True)])
        async with db.session() as s:
            again = await execute_rows(s, upsert, [user_row("u1", ""), user_row("u3", "Cy")])
        by_name = {r.platform_user_id: r for r in first + again}
        assert {r.platform_user_id for r in first} == {"u1", "u2"}
        assert by_name["u1"].display_name == "Ann"  # "" keeps the name we had
        assert by_name["u2"].is_admin is True and by_name["u3"].is_admin is False
        assert by_name["u3"].created_at == NOW and by_name["u3"].created_at.tzinfo is not None
        assert [r.id for r in again if r.platform_user_id == "u1"] == [
            r.id for r in first if r.platform_user_id == "u1"
        ]
    finally:
        await db.close()


async def test_a_batch_past_sqlites_parameter_limit_is_written_in_parts(sqlite_url, monkeypatch):
    # SQLite only: on PostgreSQL the rows are one JSON parameter, with no limit to split at.
    db = await migrated(sqlite_url)
    monkeypatch.setattr(bulk, "SQLITE_MAX_VARIABLES", 20)  # 2 user rows of 9 values per statement
    statement = from_rows(insert(USERS), USERS, tuple(user_row("x", "x")), postgres=False).returning(
        USERS.c.id
    )
    try:
        async with db.session() as s:
            ids = [r.id for r in await execute_rows(s, statement, [user_row(f"p{i}", "P") for i in range(5)])]
        assert len(set(ids)) == 5
        async with db.read() as s:
            stored = (await s.execute(select(USERS.c.platform_user_id).where(USERS.c.id.in_(ids)))).scalars()
            assert sorted(stored) == [f"p{i}" for i in range(5)]
    finally:
        await db.close()


async def test_one_of_matches_what_in_matches(db_url):
    """Values of every kind the core looks up by: text with quotes and emoji, 64-bit ints, dates;
    no values at all matches nothing."""
    db = await migrated(db_url)
    pg = db.is_postgres
    try:
        async with db.session() as s:
            user_id = (
                await s.execute(insert(USERS).returning(USERS.c.id), [user_row("one-of", "O")])
            ).scalar_one()
            rows = [{**job_row(i, user_id), "idempotency_key": f"k\"'{i} ✨"} for i in range(4)]
            await execute_rows(s, from_rows(insert(JOBS), JOBS, tuple(rows[0]), postgres=pg), rows)
        keys = [rows[0]["idempotency_key"], rows[2]["idempotency_key"], "absent"]
        async with db.read() as s:

            async def keys_where(condition: Any) -> list[str]:
                found = await s.execute(select(JOBS.c.idempotency_key).where(condition))
                return sorted(found.scalars())

            expected = sorted(keys[:2])
            assert await keys_where(one_of(JOBS.c.idempotency_key, keys, postgres=pg)) == expected
            assert await keys_where(JOBS.c.idempotency_key.in_(keys)) == expected
            assert await keys_where(one_of(JOBS.c.seed, [2**62 + 1], postgres=pg)) == [
                rows[1]["idempotency_key"]
            ]
            assert len(await keys_where(one_of(JOBS.c.quota_period, [NOW.date()], postgres=pg))) == 4
            assert (
                await keys_where(
                    one_of(JOBS.c.quota_period, [NOW.date() - dt.timedelta(days=1)], postgres=pg)
                )
                == []
            )
            assert await keys_where(one_of(JOBS.c.idempotency_key, [], postgres=pg)) == []
    finally:
        await db.close()
