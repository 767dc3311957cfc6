"""What makes the core fast, checked for what it must still be: queue positions told to users are
right under concurrent submissions, a claim takes several jobs in fair order in one round trip,
dispatchers in several processes share the work without running a job twice, and on PostgreSQL a
dispatcher is woken by another process's submission (LISTEN/NOTIFY), not by its poll."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from bot.core.api import Actor
from bot.core.models import Job
from tests.core.helpers import GUILD, running_core

REPO = Path(__file__).resolve().parents[2]


def users(n: int) -> list[Actor]:
    return [Actor("discord", f"u{i}", f"U{i}") for i in range(n)]


async def test_positions_told_are_right_under_concurrent_submits(db_url, tmp_path):
    """Two processes' worth of cores submit at once (12 users, 3 jobs each, each user's one after
    the other): the positions users are told are 1..n, each once, and are the order claims take."""
    async with (
        running_core(db_url, tmp_path, start=False) as (one, _),
        running_core(db_url, tmp_path, start=False) as (two, _),
    ):

        async def user_submits(i: int, actor: Actor) -> list[int]:
            core = one if i % 2 else two
            return [
                (
                    await core.service.imagine(
                        actor, GUILD, f"{actor.user_id} {k}", idempotency_key=f"{i}-{k}"
                    )
                ).id
                for k in range(3)
            ]

        per_user = await asyncio.gather(*[user_submits(i, a) for i, a in enumerate(users(12))])
        jobs = [job for mine in per_user for job in mine]
        told = {job: await one.service.queue_position(job) for job in jobs}
        assert sorted(told.values()) == list(range(1, 37))  # 1..36, each once
        # The positions reported through on_queued are the same.
        reported = dict(await two.service.queue.positions_to_report(["discord"], only_new=False))
        assert reported == told
        # Fair: every user's first job before anybody's second, second before anybody's third.
        for k in range(3):
            assert {told[mine[k]] for mine in per_user} == set(range(12 * k + 1, 12 * k + 13))
        # And they are the order the dispatchers take the jobs in.
        taken = [c.view.id for c in await one.service.claims.claim_queued("a", ["discord"], 10)]
        taken += [c.view.id for c in await two.service.claims.claim_queued("b", ["discord"], 100)]
        assert taken == sorted(jobs, key=told.__getitem__)
        assert await one.service.queue_position(jobs[0]) is None  # running: no place in the queue


async def test_a_claim_takes_several_jobs_in_fair_order_in_one_round_trip(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        alice, bob = users(2)
        for k in range(4):
            await core.service.imagine(alice, GUILD, f"alice {k}", idempotency_key=f"a{k}")
        await core.service.imagine(bob, GUILD, "bob 0", idempotency_key="b0")
        statements: list[str] = []

        def record(conn, cursor, statement, *args):  # noqa: ANN001 - SQLAlchemy event signature
            if statement.split()[0].upper() not in ("BEGIN", "COMMIT", "ROLLBACK"):
                statements.append(statement)

        event.listen(core.db.engine.sync_engine, "before_cursor_execute", record)
        try:
            first = await core.service.claims.claim_queued("one", ["discord"], 3)
        finally:
            event.remove(core.db.engine.sync_engine, "before_cursor_execute", record)
        assert [c.view.prompt for c in first] == ["alice 0", "bob 0", "alice 1"]
        # The claim itself (UPDATE ... RETURNING) and the read of the claimed jobs' views.
        assert len(statements) == 2, statements
        assert [c.priority for c in first] == [0, 0, 1]  # alice 1 has alice 0 running before it
        assert all(c.view.state == "running" and c.view.attempts == 1 for c in first)
        rest = await core.service.claims.claim_queued("two", ["discord"], 10)
        assert [c.view.prompt for c in rest] == ["alice 2", "alice 3"]
        assert await core.service.claims.claim_queued("three", ["discord"], 10) == []
        async with core.db.read() as s:
            owners = dict((await s.execute(select(Job.prompt, Job.lease_owner))).tuples().all())
        assert owners == {
            "alice 0": "one",
            "bob 0": "one",
            "alice 1": "one",
            "alice 2": "two",
            "alice 3": "two",
        }


async def test_concurrent_claims_never_take_the_same_job(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        for i, actor in enumerate(users(40)):
            await core.service.imagine(actor, GUILD, f"p{i}", idempotency_key=f"k{i}")
        claims = core.service.claims
        batches = await asyncio.gather(*[claims.claim_queued(f"d{i}", ["discord"], 3) for i in range(16)])
        taken = [c.view.id for batch in batches for c in batch]
        assert len(taken) == len(set(taken)) == 40


DISPATCHER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from bot.backends.fake import FakeBackend
    from tests.core.helpers import running_core

    class Recording:
        def __init__(self, path):
            self.path = path
        async def on_queued(self, job, position):
            pass
        async def on_progress(self, job, step, total):
            pass
        async def on_waiting(self, job, message):
            pass
        async def on_succeeded(self, job, images):
            with open(self.path, "a") as f:
                f.write(f"{job.id}\\n")
        async def on_failed(self, job, message):
            with open(self.path, "a") as f:
                f.write(f"failed {job.id}\\n")

    async def release_when(backend, go):
        # Jobs wait until the test has seen every process run some: then a process that happens to
        # be quicker (or the others descheduled on a loaded machine) cannot take all the work.
        while not os.path.exists(go):
            await asyncio.sleep(0.02)
        backend.release()

    async def main(url, tmp, out, go):
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        from pathlib import Path
        backend = FakeBackend(delay_s=0.02)
        backend.hold()
        releasing = asyncio.create_task(release_when(backend, go))
        async with running_core(url, Path(tmp), backend=backend, deliver=(),
                                bot={"dispatch_concurrency": 2}) as (core, _):
            core.service.register_delivery("discord", Recording(out))
            print("READY", flush=True)
            await stop.wait()
        releasing.cancel()

    asyncio.run(main(*sys.argv[1:5]))
    """
)


async def undelivered(core) -> int:  # noqa: ANN001 - a bootstrap.Core
    async with core.db.read() as s:
        return (
            await s.execute(select(func.count()).select_from(Job).where(Job.delivered_at.is_(None)))
        ).scalar_one()


async def running_owners(core) -> set[str]:  # noqa: ANN001 - a bootstrap.Core
    async with core.db.read() as s:
        rows = await s.execute(select(Job.lease_owner).where(Job.state == "running").distinct())
        return {owner for owner in rows.scalars() if owner}


async def test_dispatcher_processes_share_the_work_and_run_each_job_once(db_url, tmp_path):
    """Three dispatcher processes and a submitting one: every job runs and is delivered once, and
    the work is spread over the processes."""
    outs = [tmp_path / f"delivered-{i}.txt" for i in range(3)]
    go = tmp_path / "go"  # the processes' backends hold their jobs until it exists
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            DISPATCHER,
            db_url,
            str(tmp_path),
            str(out),
            str(go),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        for out in outs
    ]
    try:
        for proc in procs:
            assert (await asyncio.wait_for(proc.stdout.readline(), 120)).strip() == b"READY"
        async with running_core(db_url, tmp_path, start=False) as (core, _):
            jobs = await asyncio.gather(
                *[
                    core.service.imagine(actor, GUILD, f"p{i}", idempotency_key=f"k{i}")
                    for i, actor in enumerate(users(60))
                ]
            )
            # Each process runs at most 2 jobs at once, held: the others are left for the rest. The
            # work is shared once every process holds some; how fast each one is does not matter.
            async with asyncio.timeout(120):
                while len(await running_owners(core)) < len(procs):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            go.touch()
            for job in jobs:
                assert (await core.service.wait_for_job(job.id, 120)).state == "succeeded"
            async with asyncio.timeout(60):  # delivered (marked so) just after it succeeded
                # Another process writes it: nothing to wait on here but the row.
                while await undelivered(core):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            async with core.db.read() as s:
                assert (await s.execute(select(func.max(Job.attempts)))).scalar_one() == 1
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 60)
    delivered = [[int(line) for line in out.read_text().split()] if out.exists() else [] for out in outs]
    every = [job for mine in delivered for job in mine]
    assert sorted(every) == sorted(job.id for job in jobs)  # each job delivered once, by one process
    assert all(delivered), [len(mine) for mine in delivered]  # the processes shared the work


@pytest.mark.postgres
async def test_a_submission_in_another_process_wakes_the_dispatcher_through_notify(pg_session_url, tmp_path):
    """The dispatcher's poll is an hour: only the NOTIFY of the other core's submission (a
    service of its own: its in-process wake-up does not reach this dispatcher) can start the job."""
    from tests.core.conftest import truncate

    await truncate(pg_session_url)
    slow_poll = {"poll_interval_s": 3600.0}
    async with (
        running_core(pg_session_url, tmp_path, bot=slow_poll) as (dispatching, delivery),
        running_core(pg_session_url, tmp_path, start=False) as (submitting, _),
    ):
        await delivery.wait_for(lambda: dispatching.dispatcher.listening, within_s=30)
        await asyncio.sleep(0.2)  # let the tick the listener's start asked for go by
        alice = users(1)[0]
        job = await submitting.service.imagine(alice, GUILD, "woken", idempotency_key="n1")
        assert (await submitting.service.wait_for_job(job.id, 60)).state == "succeeded"
        await delivery.wait_for(lambda: job.id in delivery.succeeded)
    async with running_core(pg_session_url, tmp_path, database={"notify": False}) as (quiet, _):
        await asyncio.sleep(0.2)
        assert not quiet.dispatcher.listening  # notify off: no listener, the poll alone


async def test_the_queue_limit_refuses_only_a_full_queue(db_url, tmp_path):
    """The queue is counted now and then, not on every submission; a claim frees a place at once
    all the same: a refusal is checked by a count first."""
    from bot.core.api import Overloaded

    async with running_core(db_url, tmp_path, start=False, bot={"max_queued_jobs": 1}) as (core, _):
        alice, bob, carol = users(3)
        await core.service.imagine(alice, GUILD, "first", idempotency_key="q1")
        assert len(await core.service.claims.claim_queued("d", ["discord"], 1)) == 1
        await core.service.imagine(bob, GUILD, "second", idempotency_key="q2")  # the place is free
        with pytest.raises(Overloaded):
            await core.service.imagine(carol, GUILD, "third", idempotency_key="q3")
        assert (await core.service.quota(carol, GUILD)).used_today == 0  # refused: nothing charged


async def test_submissions_at_once_share_a_transaction_and_each_gets_its_own_outcome(db_url, tmp_path):
    """Submissions arriving together are written in one transaction (group commit), yet each gets
    its own answer: a refusal (quota, ban, moderation, a key someone else used) is that
    submission's alone, a retried key returns its job uncharged, and the quotas stay exact."""
    from bot.core.api import BadParameters, Banned, Moderated, QuotaExceeded

    async with running_core(
        db_url, tmp_path, start=False, quotas={"daily_limit": 2}, moderation={"banned_terms": ["gore"]}
    ) as (core, _):
        admin = Actor("discord", "root", "Root", is_admin=True)
        crowd = users(30)
        banned, greedy, retrier, thief = crowd[:4]
        await core.service.ban(admin, banned.user_id, "spam")
        inserts: list[str] = []

        def record(conn, cursor, statement, *args):  # noqa: ANN001 - SQLAlchemy event signature
            if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
                inserts.append(statement)

        event.listen(core.db.engine.sync_engine, "before_cursor_execute", record)
        try:
            outcomes = await asyncio.gather(
                core.service.imagine(banned, GUILD, "hello", idempotency_key="banned"),
                core.service.imagine(greedy, GUILD, "one", idempotency_key="g1"),
                core.service.imagine(greedy, GUILD, "two", idempotency_key="g2"),
                core.service.imagine(greedy, GUILD, "three", idempotency_key="g3"),  # over the limit
                core.service.imagine(retrier, GUILD, "once", idempotency_key="r1"),
                core.service.imagine(retrier, GUILD, "once", idempotency_key="r1"),  # the same event
                core.service.imagine(thief, GUILD, "mine", idempotency_key="r1"),  # someone else's key
                core.service.imagine(crowd[4], GUILD, "some gore", idempotency_key="gore"),
                *[
                    core.service.imagine(actor, GUILD, f"fine {i}", idempotency_key=f"ok{i}")
                    for i, actor in enumerate(crowd[5:])
                ],
                return_exceptions=True,
            )
        finally:
            event.remove(core.db.engine.sync_engine, "before_cursor_execute", record)
        banned_out, g1, g2, g3, r1, r1_again, stolen, gore, *fine = outcomes
        assert isinstance(banned_out, Banned)
        assert g1.created and g2.created and isinstance(g3, QuotaExceeded)
        assert r1.created and r1_again.id == r1.id and not r1_again.created
        assert isinstance(stolen, BadParameters) and stolen.field == "idempotency_key"
        assert isinstance(gore, Moderated)
        assert all(view.created for view in fine) and len({view.id for view in fine}) == 25
        # 30 accepted-or-refused submissions, far fewer multi-row INSERTs.
        assert 1 <= len(inserts) < 10, len(inserts)
        assert (await core.service.quota(greedy, GUILD)).used_today == 2
        assert (await core.service.quota(retrier, GUILD)).used_today == 1  # charged once
        assert (await core.service.quota(thief, GUILD)).used_today == 0
        assert (await core.service.quota(banned, GUILD)).used_today == 0
        async with core.db.read() as s:
            assert (await s.execute(select(func.count()).select_from(Job))).scalar_one() == 2 + 1 + 25
        # Fair rounds as one at a time would give them: greedy's second job a round after its first.
        positions = {v.id: await core.service.queue_position(v.id) for v in (g1, g2, *fine)}
        assert positions[g2.id] > max(positions[v.id] for v in fine)


async def test_the_look_for_expired_leases_reads_the_leased_jobs_only(sqlite_url, tmp_path):
    """A dispatcher looks for expired leases once per poll interval; it must read the jobs holding a
    lease (the partial index `ix_jobs_leased`), not every job ever made. SQLite without statistics
    (no ANALYZE, as a bot's database has) is the planner most easily led to another index."""
    async with running_core(sqlite_url, tmp_path, start=False) as (core, _):
        for k in range(3):
            await core.service.imagine(users(1)[0], GUILD, f"p{k}", idempotency_key=f"k{k}")
        looks: list[tuple[str, object]] = []

        def record(conn, cursor, statement, parameters, *args):  # noqa: ANN001 - SQLAlchemy event
            if statement.lstrip().upper().startswith("SELECT"):
                looks.append((statement, parameters))

        event.listen(core.db.engine.sync_engine, "before_cursor_execute", record)
        try:
            assert await core.service.claims.take_over_expired("me", ["discord"], []) is None
        finally:
            event.remove(core.db.engine.sync_engine, "before_cursor_execute", record)
        [(statement, parameters)] = looks
        async with core.db.read() as s:
            conn = await s.connection()
            plan = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            details = " ".join(str(row[-1]) for row in plan)
        assert "ix_jobs_leased" in details, details
