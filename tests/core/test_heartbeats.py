"""Dispatcher liveness by heartbeat (bot/core/heartbeats.py) on the real database: dispatchers that
share a hostname and a PID (containers with separate PID namespaces) never take each other's live
jobs; a dispatcher that stops beating has its jobs taken over before its lease runs out."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket

from sqlalchemy import select, update

from bot.backends.fake import FakeBackend
from bot.core.heartbeats import Heartbeats
from bot.core.models import DispatcherHeartbeat, Job
from tests.core.helpers import ALICE, GUILD, running_core

# One hostname, one PID that this process namespace does not have (above any pid_max): to the old
# hostname+PID judgement each of these owners looked dead to the other.
SHARED = f"{socket.gethostname()}:{2**30}"
# A beat (and a look for dead owners) every 0.5 s; dead after 10 s without one (MIN_STALE_S).
FAST = {"lease_s": 6.0, "poll_interval_s": 0.25}


async def test_same_host_and_pid_dispatchers_keep_their_own_jobs(db_url, tmp_path):
    b1, b2 = FakeBackend(), FakeBackend()
    b1.hold()
    async with (
        running_core(db_url, tmp_path, backend=b1, owner=f"{SHARED}:aaaa", bot=FAST) as (core1, d1),
        running_core(db_url, tmp_path, backend=b2, owner=f"{SHARED}:bbbb", bot=FAST, deliver=()) as (
            core2,
            _,
        ),
    ):
        job = await core1.service.imagine(ALICE, GUILD, "mine", idempotency_key="h1")
        await d1.wait_for(lambda: len(b1.calls) == 1)
        core2.service.register_delivery("discord", d1)  # now the second one could take it
        await asyncio.sleep(4.0)  # several stale-checks by the second dispatcher (no timing asserted)
        async with core1.db.read() as s:
            row = await s.get(Job, job.id)
            beats = set((await s.execute(select(DispatcherHeartbeat.owner))).scalars())
        assert row.lease_owner == f"{SHARED}:aaaa" and b2.calls == []
        assert beats == {f"{SHARED}:aaaa", f"{SHARED}:bbbb"}
        b1.release()
        done = await core1.service.wait_for_job(job.id, 30)
        assert done.state == "succeeded" and done.attempts == 1


async def test_a_dispatcher_that_stops_beating_loses_its_jobs_before_the_lease_ends(db_url, tmp_path):
    backend = FakeBackend()
    async with running_core(db_url, tmp_path, backend=backend, bot=FAST) as (core, delivery):
        core.service.unregister_delivery("discord")  # keep it from claiming the job the normal way
        job = await core.service.imagine(ALICE, GUILD, "orphan", idempotency_key="h2")
        now = core.service.clock()
        async with core.db.session() as s:
            # A dispatcher that claimed the job for an hour, then stopped beating (frozen, or its
            # host went away).
            await s.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(
                    state="running",
                    lease_owner="ghost:1:x",
                    lease_until=now + dt.timedelta(hours=1),
                    attempts=1,
                )
            )
            s.add(DispatcherHeartbeat(owner="ghost:1:x", beat_at=now - dt.timedelta(seconds=60)))
        core.service.register_delivery("discord", delivery)
        done = await core.service.wait_for_job(job.id, 30)
        assert done.state == "succeeded" and len(backend.calls) == 1
        async with core.db.read() as s:
            assert await s.get(DispatcherHeartbeat, "ghost:1:x") is None


async def test_dead_owners_are_reported_once_and_a_clean_stop_leaves_no_row(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        job = await core.service.imagine(ALICE, GUILD, "x", idempotency_key="h3")
        t = [core.service.clock()]
        me = Heartbeats(core.db, lambda: t[0], owner="me:1:a", lease_s=60.0)
        other = Heartbeats(core.db, lambda: t[0], owner="other:1:b", lease_s=60.0)
        await me.beat()
        await other.beat()
        async with core.db.session() as s:
            await s.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(state="running", lease_owner="other:1:b", lease_until=t[0] + dt.timedelta(seconds=60))
            )
        t[0] += dt.timedelta(seconds=10)  # two missed beats: not dead yet
        await me.beat()
        assert await me.expire_dead_owners() == []
        t[0] += dt.timedelta(seconds=10)  # four missed: dead
        assert await me.expire_dead_owners() == ["other:1:b"]
        assert await me.expire_dead_owners() == []  # news once
        async with core.db.read() as s:
            assert (await s.get(Job, job.id)).lease_until <= t[0]
        await me.forget()
        async with core.db.read() as s:
            assert list((await s.execute(select(DispatcherHeartbeat))).scalars()) == []


async def test_the_capacity_is_shared_with_the_live_dispatchers_that_run_jobs(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        t = [core.service.clock()]
        me = Heartbeats(core.db, lambda: t[0], owner="me:1:a", lease_s=60.0)
        assert await me.sharing_dispatchers() == 1  # before any beat: this one alone
        jobs = [await core.service.imagine(ALICE, GUILD, f"j{i}", idempotency_key=f"s{i}") for i in range(4)]
        running = {
            "busy:1:b": jobs[0].id,
            "busy:1:c": jobs[1].id,
            "dead:1:d": jobs[2].id,
            "me:1:a": jobs[3].id,
        }
        async with core.db.session() as s:
            for owner, job_id in running.items():
                await s.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(state="running", lease_owner=owner, lease_until=t[0] + dt.timedelta(seconds=60))
                )
            s.add(DispatcherHeartbeat(owner="dead:1:d", beat_at=t[0] - dt.timedelta(seconds=60)))
            s.add(DispatcherHeartbeat(owner="idle:1:e", beat_at=t[0]))  # alive, running nothing
            s.add(DispatcherHeartbeat(owner="busy:1:b", beat_at=t[0]))
            s.add(DispatcherHeartbeat(owner="busy:1:c", beat_at=t[0]))
        await me.beat()
        # Me and the two busy ones; not the idle one, nor the one whose heartbeat is stale.
        assert await me.sharing_dispatchers() == 3
        t[0] += dt.timedelta(seconds=30)  # every other heartbeat goes stale
        assert await me.sharing_dispatchers() == 1
