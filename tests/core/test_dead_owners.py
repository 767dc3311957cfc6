"""Regression: a process killed after its result was shown (the adapter recorded the result message)
but before the dispatcher released the job left a finished, delivered job claimed by a dead owner,
and the next process reported that owner on every look, for ever. Now (heartbeat liveness,
bot/core/heartbeats.py) the dead owner's finished jobs lose their claim on the first look, its
unfinished ones are free to take over at once, and nothing is reported twice."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update

from bot.core.heartbeats import Heartbeats
from bot.core.models import DispatcherHeartbeat, Job
from tests.core.helpers import ALICE, GUILD, running_core

DEAD = "same-host:1:deadbeef"  # hostname and pid play no part any more


async def _dead_owner(core, now: dt.datetime) -> None:
    async with core.db.session() as s:
        s.add(DispatcherHeartbeat(owner=DEAD, beat_at=now - dt.timedelta(minutes=5)))


async def test_finished_jobs_of_a_dead_owner_are_released_once(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        delivered = await core.service.imagine(ALICE, GUILD, "shown", idempotency_key="a")
        running = await core.service.imagine(ALICE, GUILD, "in flight", idempotency_key="b")
        now = core.service.clock()
        later = now + dt.timedelta(minutes=10)
        await _dead_owner(core, now)
        async with core.db.session() as s:
            await s.execute(
                update(Job)
                .where(Job.id == delivered.id)
                .values(state="succeeded", delivered_at=now, lease_owner=DEAD, lease_until=later)
            )
            await s.execute(
                update(Job)
                .where(Job.id == running.id)
                .values(state="running", lease_owner=DEAD, lease_until=later)
            )
        me = Heartbeats(core.db, core.service.clock, owner="same-host:1:alive", lease_s=60.0)
        await me.beat()
        first = await me.expire_dead_owners()
        second = await me.expire_dead_owners()
        async with core.db.read() as s:
            rows = {j.id: j for j in (await s.execute(select(Job))).scalars()}
    assert first == [DEAD] and second == []  # news once, not on every look
    assert rows[delivered.id].lease_owner is None and rows[delivered.id].lease_until is None
    assert rows[running.id].lease_owner == DEAD and rows[running.id].lease_until <= core.service.clock()


async def test_a_dead_owner_with_only_delivered_jobs_is_no_news(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        job = await core.service.imagine(ALICE, GUILD, "shown", idempotency_key="a")
        now = core.service.clock()
        await _dead_owner(core, now)
        async with core.db.session() as s:
            await s.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(state="succeeded", delivered_at=now, lease_owner=DEAD, lease_until=now)
            )
        me = Heartbeats(core.db, core.service.clock, owner="same-host:1:alive", lease_s=60.0)
        assert await me.expire_dead_owners() == []
        async with core.db.read() as s:
            assert (await s.get(Job, job.id)).lease_owner is None
