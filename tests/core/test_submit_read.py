"""The submit batch's reads after its users' upsert run as one statement (`bot.core.tagged_reads`):
a batch of several users runs a fixed, small number of statements, and the one read gives every
check of the batch what the separate reads gave: reused keys (the user's own and someone else's),
the quota limit that applies (role over guild), the fair round of a user with jobs queued, and a
full queue."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import event, select

from bot.core.api import Actor, BadParameters, Overloaded, QuotaExceeded
from bot.core.models import Job, QuotaUsage
from bot.core.quotas import Quotas
from bot.core.tagged_reads import merged, part
from tests.core.helpers import ADMIN, GUILD, running_core

BLOCKER = Actor("discord", "blocker", "Blocker")


async def one_batch(
    core: Any, submissions: list[Callable[[], Awaitable[Any]]]
) -> tuple[list[Any], list[str]]:
    """Run `submissions` as one batch of the submit writer, in this order: the outcome of each, and
    the statements the batch ran (BEGIN and COMMIT left out). A blocker's submission goes first and
    its batch waits while the others queue up behind it, so they all join the next one."""
    submitting = core.service._submissions
    writer = submitting.writer
    write = writer.write
    gate = asyncio.Event()
    batches: list[int] = []
    statements: list[str] = []

    def record(conn, cursor, statement, *args):  # noqa: ANN001 - SQLAlchemy event signature
        if statement.split()[0].upper() not in ("BEGIN", "COMMIT", "ROLLBACK"):
            statements.append(" ".join(statement.split()))

    async def gated(batch: list[Any], **kwargs: Any) -> Any:
        batches.append(len(batch))
        if len(batches) == 1:
            await gate.wait()
            return await write(batch, **kwargs)
        event.listen(core.db.engine.sync_engine, "before_cursor_execute", record)
        try:
            return await write(batch, **kwargs)
        finally:
            event.remove(core.db.engine.sync_engine, "before_cursor_execute", record)

    writer.write = gated
    try:
        blocker = asyncio.create_task(
            core.service.imagine(BLOCKER, GUILD, "first", idempotency_key=f"blocker-{id(gate)}")
        )
        await _until(lambda: batches == [1])
        tasks = []
        for submit in submissions:  # one at a time into the queue: the batch keeps this order
            waiting = len(submitting._batches._pending)
            tasks.append(asyncio.ensure_future(submit()))
            await _until(lambda: len(submitting._batches._pending) > waiting)  # noqa: B023
        gate.set()
        await blocker
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        del writer.write
    assert batches == [1, len(submissions)], batches
    return outcomes, statements


async def _until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110 - polls state that no event announces
            await asyncio.sleep(0.001)


async def test_a_batch_of_several_users_runs_five_statements(db_url, tmp_path):
    """The users' upsert, the one read (keys, admission, quota book), the place rules, the jobs'
    INSERT and the usage upsert: five statements for six users, whatever their number (before: nine,
    the keys, the two admission reads and the two quota reads each a statement of its own)."""
    crowd = [Actor("discord", f"u{i}", f"U{i}", role_ids=("r1",)) for i in range(6)]
    async with running_core(db_url, tmp_path, start=False, bot={"queue_depth_check_s": 60}) as (core, _):
        outcomes, statements = await one_batch(
            core,
            [
                lambda a=a, i=i: core.service.imagine(a, GUILD, f"p{i}", idempotency_key=f"k{i}")
                for i, a in enumerate(crowd)
            ],
        )
        assert all(view.created for view in outcomes), outcomes
        assert len(statements) == 5, "\n".join(statements)
        upsert, read, _rules, insert, usage = statements
        assert upsert.upper().startswith("INSERT INTO USERS")
        assert read.upper().startswith("SELECT 'USED_KEYS'") and read.upper().count("UNION ALL") == 4
        assert insert.upper().startswith("INSERT INTO JOBS")
        assert usage.upper().startswith("INSERT INTO QUOTA_USAGE")
        # A retried key reads its job's full row and images, for the view; nothing is written.
        outcomes, statements = await one_batch(
            core, [lambda: core.service.imagine(crowd[0], GUILD, "p0", idempotency_key="k0")]
        )
        assert not outcomes[0].created
        assert len(statements) == 4, "\n".join(statements)
        assert statements[2].upper().startswith("SELECT JOBS.ID") and "images" in statements[3]


async def test_the_one_read_answers_every_check_of_the_batch(db_url, tmp_path):
    alice, bob, dave, erin = (
        Actor("discord", name, name.title()) for name in ("alice", "bob", "dave", "erin")
    )
    carol = Actor("discord", "carol", "Carol", role_ids=("r1",))
    gina = Actor("discord", "gina", "Gina", role_ids=("r1", "r2"))
    # Room for two more jobs: alice's two and the blocker's are queued when the batch comes.
    async with running_core(db_url, tmp_path, start=False, bot={"max_queued_jobs": 5}) as (core, _):
        service = core.service
        await service.set_guild_limit(ADMIN, GUILD.guild_id, 3)
        await service.set_role_limit(ADMIN, GUILD, "r1", 4)
        await service.set_role_limit(ADMIN, GUILD, "r2", 2)  # the highest of a user's roles wins
        a0 = await service.imagine(alice, GUILD, "a0", idempotency_key="a0")
        a1 = await service.imagine(alice, GUILD, "a1", idempotency_key="a1")
        await _use(core, service.quotas, {carol: 4, dave: 3, gina: 3})
        outcomes, _ = await one_batch(
            core,
            [
                lambda: service.imagine(alice, GUILD, "a0", idempotency_key="a0"),  # her retry
                lambda: service.imagine(bob, GUILD, "mine", idempotency_key="a1"),  # alice's key
                lambda: service.imagine(carol, GUILD, "c", idempotency_key="c"),  # at her role's 4
                lambda: service.imagine(dave, GUILD, "d", idempotency_key="d"),  # at the guild's 3
                lambda: service.imagine(alice, GUILD, "a2", idempotency_key="a2"),
                lambda: service.imagine(gina, GUILD, "g", idempotency_key="g"),  # 3 of her role's 4
                lambda: service.imagine(erin, GUILD, "e", idempotency_key="e"),  # the queue is full
            ],
        )
        again, stolen, carol_out, dave_out, a2, g, erin_out = outcomes
        assert again.id == a0.id and not again.created
        assert isinstance(stolen, BadParameters) and stolen.field == "idempotency_key"
        assert isinstance(carol_out, QuotaExceeded) and carol_out.daily_limit == 4
        assert isinstance(dave_out, QuotaExceeded) and dave_out.daily_limit == 3
        assert a2.created and g.created
        assert isinstance(erin_out, Overloaded)
        async with core.db.read() as s:
            rounds = dict((await s.execute(select(Job.prompt, Job.fair_round))).tuples().all())
        assert rounds["a1"] == rounds["a0"] + 1
        assert rounds["a2"] == rounds["a1"] + 1  # the round after her last queued one
        assert rounds["g"] == rounds["first"] == rounds["a0"]  # newcomers: the round being served
        quota = {
            a.user_id: (await service.quota(a, GUILD)).used_today
            for a in (alice, bob, carol, dave, gina, erin)
        }
        assert quota == {"alice": 3, "bob": 0, "carol": 4, "dave": 3, "gina": 4, "erin": 0}
        assert (await service.quota(gina, GUILD)).daily_limit == 4
        assert a1.created


async def _use(core: Any, quotas: Quotas, used: dict[Actor, int]) -> None:
    """Set users' usage in today's period, as if they had submitted that many images."""
    period = quotas.period_for(dt.datetime.now(dt.UTC))[0]
    async with core.db.session() as s:
        for actor, images in used.items():
            user = await quotas.lock_user(s, actor.platform, actor.user_id, actor.display_name)
            s.add(QuotaUsage(user_id=user.id, period=period, images_used=images))


async def test_the_notification_is_in_a_part_of_one_row(pg_session_url, tmp_path):
    """PostgreSQL: `pg_notify` is in the admission's `rounds` part, which is one row whatever the
    queue and the batch (two aggregates with no FROM), so a batch notifies once."""
    async with running_core(pg_session_url, tmp_path, start=False) as (core, _):
        queue = core.service.queue
        rounds, _own = queue._admission_parts
        assert "pg_notify" in str(rounds.compile(dialect=core.db.engine.dialect))
        assert rounds.get_final_froms() == []  # no FROM: one row
        for k in range(3):
            await core.service.imagine(Actor("discord", f"n{k}", ""), GUILD, "x", idempotency_key=f"n{k}")
        parts, params = queue.admission_read([1, 2, 3], storm=True)
        async with core.db.session() as s:
            rows = (await s.execute(merged(parts), params)).all()
        assert [row.tag for row in rows].count("rounds") == 1


def test_parts_of_two_owners_may_not_share_a_parameter_name():
    from sqlalchemy import Integer, bindparam, literal_column

    one = part("one", ints=[bindparam("x", type_=Integer)])
    two = part("two", ints=[literal_column("1", Integer)]).where(bindparam("x", type_=Integer) > 0)
    with pytest.raises(ValueError, match="'x'"):
        merged([one], [two])
    merged([one, two])  # one owner's parts may share one
