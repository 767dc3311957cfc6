"""Regression: a process killed after its result was shown (the adapter recorded the result message)
but before the dispatcher released the job left a finished, delivered job claimed by a dead owner.
The next process logged "claims of dead local process(es) ... expire now" on every look, for ever.
Now the dead owner's finished jobs lose their claim on the first look, and nothing is reported twice."""

from __future__ import annotations

import datetime as dt
import socket

from sqlalchemy import select, update

from bot.core.models import Job
from tests.core.helpers import ALICE, GUILD, running_core

# A pid no process has: above the kernel's pid_max (at most 2**22).
DEAD = f"{socket.gethostname()}:{2**30}:deadbeef"


async def test_finished_jobs_of_a_dead_owner_are_released_once(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        delivered = await core.service.imagine(ALICE, GUILD, "shown", idempotency_key="a")
        running = await core.service.imagine(ALICE, GUILD, "in flight", idempotency_key="b")
        later = core.service.clock() + dt.timedelta(minutes=10)
        async with core.db.session() as s:
            await s.execute(
                update(Job)
                .where(Job.id == delivered.id)
                .values(
                    state="succeeded", delivered_at=core.service.clock(), lease_owner=DEAD, lease_until=later
                )
            )
            await s.execute(
                update(Job)
                .where(Job.id == running.id)
                .values(state="running", lease_owner=DEAD, lease_until=later)
            )
        claims = core.service.claims
        first = await claims.expire_dead_local_owners("me:1:x")
        second = await claims.expire_dead_local_owners("me:1:x")
        async with core.db.read() as s:
            rows = {j.id: j for j in (await s.execute(select(Job))).scalars()}
    assert first == [DEAD] and second == []  # news once, not on every look
    assert rows[delivered.id].lease_owner is None and rows[delivered.id].lease_until is None
    assert rows[running.id].lease_owner == DEAD and rows[running.id].lease_until <= core.service.clock()


async def test_a_dead_owner_with_only_delivered_jobs_is_no_news(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        job = await core.service.imagine(ALICE, GUILD, "shown", idempotency_key="a")
        async with core.db.session() as s:
            await s.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(
                    state="succeeded",
                    delivered_at=core.service.clock(),
                    lease_owner=DEAD,
                    lease_until=core.service.clock(),
                )  # fmt: skip
            )
        assert await core.service.claims.expire_dead_local_owners("me:1:x") == []
        async with core.db.read() as s:
            assert (await s.get(Job, job.id)).lease_owner is None
