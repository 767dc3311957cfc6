"""Dispatcher liveness by heartbeat: who may take over a claim before its lease runs out.

Every dispatcher renews its row in `dispatcher_heartbeats` every `lease_s / 12` (5 s by default;
at least its `poll_interval_s`),
whether or not it holds jobs, and deletes it when it stops. A dispatcher whose row is older than
three intervals and polls (16.5 s by default) is dead: the leases it holds expire at once and its jobs
are taken over, on any host. This replaces judging by hostname and PID, which fails when two
containers share a hostname in separate PID namespaces (one sees the other's PID as gone and takes
its live jobs) and cannot see a process on another host at all.

Owners with no row (a process from before heartbeats, or one that stopped cleanly and released its
claims) are not judged here: their leases expire by time, as before. A long database outage stops
every beat alike, and the survivors' first beats come before anyone looks again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from sqlalchemy import delete, func, insert, or_, select, update

from bot.core.db import Database, rows_matched
from bot.core.models import DispatcherHeartbeat, Job

# Beats per lease, and beats missed before an owner counts as dead: a lease of 60 s beats every
# 5 s and declares an owner dead after 16.5 s without one (a slow tick or a GC pause is well below).
BEATS_PER_LEASE = 12
MISSED_BEATS = 3
# Never sooner: an event loop stalled for a few seconds (a busy CPU, a slow disk, a long GC) is
# alive, and taking its jobs would run them twice. Short leases (tests) expire by time anyway.
MIN_STALE_S = 10.0


class Heartbeats:
    def __init__(
        self,
        db: Database,
        clock: Callable[[], dt.datetime],
        *,
        owner: str,
        lease_s: float,
        poll_interval_s: float = 0.0,
    ):
        self.db = db
        self.clock = clock
        self.owner = owner
        # The dispatcher beats from its loop, which looks at least every poll_interval_s.
        self.interval_s = max(lease_s / BEATS_PER_LEASE, poll_interval_s)
        # A beat is due every interval_s but goes out at the loop's next look, up to a poll later.
        self.stale_s = max(MIN_STALE_S, (self.interval_s + poll_interval_s) * MISSED_BEATS)

    async def beat(self) -> None:
        """Renew this dispatcher's row (only it writes it: update, else insert, on any database)."""
        now = self.clock()
        async with self.db.session() as s:
            done = await s.execute(
                update(DispatcherHeartbeat).where(DispatcherHeartbeat.owner == self.owner).values(beat_at=now)
            )
            if not rows_matched(done):
                await s.execute(insert(DispatcherHeartbeat).values(owner=self.owner, beat_at=now))

    async def sharing_dispatchers(self) -> int:
        """Dispatchers sharing the servers now: this one, and every other one with a fresh heartbeat
        that is running jobs (bot/core/concurrency.py). An idle one (a process whose platforms have
        no traffic) takes no share, so it does not halve the others'."""
        cutoff = self.clock() - dt.timedelta(seconds=self.stale_s)
        alive = select(DispatcherHeartbeat.owner).where(DispatcherHeartbeat.beat_at >= cutoff)
        async with self.db.read() as s:
            others = (
                await s.execute(
                    select(func.count(Job.lease_owner.distinct())).where(
                        Job.state == "running", Job.lease_owner != self.owner, Job.lease_owner.in_(alive)
                    )
                )
            ).scalar_one()
        return 1 + int(others)

    async def forget(self) -> None:
        """At a clean stop (after the claims are released): nobody needs to judge us any more."""
        async with self.db.session() as s:
            await s.execute(delete(DispatcherHeartbeat).where(DispatcherHeartbeat.owner == self.owner))

    async def expire_dead_owners(self) -> list[str]:
        """Expire at once the leases held by owners whose heartbeat is stale; return them (each
        once: a dead owner whose leases expired already is not news). Their rows go too."""
        cutoff = self.clock() - dt.timedelta(seconds=self.stale_s)
        async with self.db.read() as s:
            dead = list(
                (
                    await s.execute(
                        select(DispatcherHeartbeat.owner).where(
                            DispatcherHeartbeat.beat_at < cutoff, DispatcherHeartbeat.owner != self.owner
                        )
                    )
                ).scalars()
            )
        if not dead:
            return []
        async with self.db.session() as s:
            now = self.clock()
            # Finished and delivered jobs of a dead owner need nobody: their claim goes.
            await s.execute(
                update(Job)
                .where(
                    Job.lease_owner.in_(dead), or_(Job.delivered_at.is_not(None), Job.state == "cancelled")
                )
                .values(lease_owner=None, lease_until=None)
            )
            # What still needs work (running, or an outcome to deliver) is free to take over now.
            expired = await s.execute(
                update(Job).where(Job.lease_owner.in_(dead), Job.lease_until > now).values(lease_until=now)
            )
            await s.execute(
                delete(DispatcherHeartbeat).where(
                    DispatcherHeartbeat.owner.in_(dead), DispatcherHeartbeat.beat_at < cutoff
                )
            )
        return dead if rows_matched(expired) else []
