"""A clean stop (SIGTERM) under load: no ERROR in the log, every job in a correct state, and the next
start finishes or delivers each job once. Cancellations are placed with the database pool's own
events (the moment a connection goes back to the pool), not with timings."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.backends.fake import FakeBackend
from bot.core.api import Actor, JobView, ResultImage
from bot.core.db import Database, make_engine
from bot.core.models import Job
from tests.core.helpers import (
    ALICE,
    BOB,
    GUILD,
    RecordingDelivery,
    assert_succeeded_undelivered,
    running_core,
)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


@contextlib.contextmanager
def cancel_at_checkin(engine: AsyncEngine, whom: set[asyncio.Task[object]]) -> Iterator[list[str]]:
    """Cancel the task that checked a connection out (when it is one of `whom`) as that connection
    is reset on its way back to the pool: the moment a shutdown's cancellation cut short in CI
    (SQLAlchemy then logged "Exception during reset or similar" at ERROR). Yields the names of the
    tasks cancelled so."""
    owners: dict[int, asyncio.Task[object]] = {}
    cut: list[str] = []
    pool = engine.sync_engine.pool

    def checkout(dbapi_connection: object, _record: object, _proxy: object) -> None:
        task = asyncio.current_task()
        if task is not None:
            owners[id(dbapi_connection)] = task

    def reset(dbapi_connection: object, _record: object, _state: object) -> None:
        task = owners.pop(id(dbapi_connection), None)
        if task is not None and task in whom and not task.done():
            whom.discard(task)
            cut.append(task.get_name())
            task.cancel()

    event.listen(pool, "checkout", checkout)
    event.listen(pool, "reset", reset)
    try:
        yield cut
    finally:
        event.remove(pool, "checkout", checkout)
        event.remove(pool, "reset", reset)


async def test_a_unit_of_work_cancelled_as_its_connection_returns_logs_no_error(db_url, caplog):
    caplog.set_level(logging.WARNING)
    db = Database(make_engine(db_url))
    try:

        async def unit() -> None:
            async with db.session() as s:
                await s.execute(text("SELECT 1"))

        task: asyncio.Task[None] = asyncio.create_task(unit())
        with cancel_at_checkin(db.engine, {task}) as cut:  # type: ignore[arg-type]
            with pytest.raises(asyncio.CancelledError):
                await task
        assert cut == [task.get_name()]
        async with db.read() as s:  # the pool still serves
            assert (await s.execute(text("SELECT 2"))).scalar() == 2
    finally:
        await db.close()
    assert errors(caplog) == []


async def test_a_clean_stop_under_load_logs_no_error_and_the_next_start_finishes_every_job_once(
    db_url, tmp_path, caplog
):
    """Users keep submitting while the dispatcher claims, runs and delivers; the stop cuts the
    dispatcher's loop as one of its transactions ends (what `Dispatcher.stop` did in CI). Nothing
    is logged at ERROR, and the next start runs and delivers every job exactly once."""
    caplog.set_level(logging.WARNING)
    keys = itertools.count()
    submitted: list[int] = []
    async with running_core(db_url, tmp_path, quotas={"daily_limit": 10_000}) as (core, delivery):

        async def submitter(user: int) -> None:
            actor = Actor("discord", f"user{user}", f"User {user}")
            for _ in range(15):  # 120 jobs in all: the stop comes while most are queued or running
                key = next(keys)
                job = await core.service.imagine(actor, GUILD, f"p{key}", idempotency_key=f"k{key}")
                submitted.append(job.id)

        submitters = [asyncio.create_task(submitter(u)) for u in range(8)]
        await delivery.wait_for(lambda: delivery.finished() >= 10)
        main = core.dispatcher._main
        assert main is not None
        with cancel_at_checkin(core.db.engine, {main}) as cut:  # type: ignore[arg-type]
            await delivery.wait_for(lambda: main.done())
            assert cut == [main.get_name()]
            for task in submitters:
                task.cancel()
            await asyncio.gather(*submitters, return_exceptions=True)
    first_run = {job_id: len(d) for job_id, d in delivery.succeeded.items()}
    assert all(n == 1 for n in first_run.values())
    async with running_core(db_url, tmp_path, quotas={"daily_limit": 10_000}) as (core, delivery):
        async with core.db.read() as s:
            jobs = set((await s.scalars(select(Job.id))).all())
        assert set(submitted) <= jobs and len(jobs) > len(first_run)  # work was left for this start
        await delivery.wait_for(lambda: len(first_run) + len(delivery.succeeded) >= len(jobs))
        async with asyncio.timeout(60):
            while True:  # each delivery is recorded just after the adapter is called
                async with core.db.read() as s:
                    undelivered = (await s.scalars(select(Job.id).where(Job.delivered_at.is_(None)))).all()
                if not undelivered:
                    break
                await asyncio.sleep(0.05)
    assert not set(first_run) & set(delivery.succeeded)  # each job delivered by one of the two runs
    assert all(len(d) == 1 for d in delivery.succeeded.values())  # once
    assert set(first_run) | set(delivery.succeeded) == jobs
    assert errors(caplog) == []


class GatedDelivery(RecordingDelivery):
    """Posting a result takes until the test opens the gate (a chat post in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.posting: set[int] = set()

    async def on_succeeded(self, job: JobView, images: Sequence[ResultImage]) -> None:
        self.posting.add(job.id)
        self._changed.set()
        await self.gate.wait()
        await super().on_succeeded(job, images)


async def test_a_stop_hands_generating_jobs_back_at_once_and_lets_a_delivery_in_flight_finish(
    db_url, tmp_path
):
    backend = FakeBackend()
    async with running_core(db_url, tmp_path, backend=backend, deliver=()) as (core, _):
        delivery = GatedDelivery()
        core.service.register_delivery("discord", delivery)
        posted = await core.service.imagine(ALICE, GUILD, "being posted", idempotency_key="a")
        await delivery.wait_for(lambda: posted.id in delivery.posting)
        backend.hold()
        generating = await core.service.imagine(BOB, GUILD, "being made", idempotency_key="b")
        await delivery.wait_for(lambda: backend.in_flight == 1)
        stop = asyncio.create_task(core.dispatcher.stop())
        # The job being made is cancelled at once; the stop waits for the post in flight.
        await delivery.wait_for(lambda: backend.calls[-1].outcome == "cancelled")
        assert not stop.done() and posted.id not in delivery.succeeded
        delivery.gate.set()
        await stop
        async with core.db.read() as s:
            a, b = await s.get(Job, posted.id), await s.get(Job, generating.id)
        assert a is not None and b is not None
        assert (a.state, a.delivery_error, a.delivery_attempts) == ("succeeded", None, 1)
        assert a.delivered_at is not None and len(delivery.succeeded[posted.id]) == 1
        assert (b.state, b.lease_owner, b.attempts) == ("queued", None, 0)  # back, attempt not spent


async def test_a_delivery_past_the_grace_is_cut_off_and_delivered_once_by_the_next_start(db_url, tmp_path):
    async with running_core(db_url, tmp_path, deliver=(), bot={"shutdown_grace_s": 0}) as (core, _):
        delivery = GatedDelivery()  # never opened: a post hanging in a platform outage
        core.service.register_delivery("discord", delivery)
        job = await core.service.imagine(ALICE, GUILD, "slow post", idempotency_key="slow")
        await delivery.wait_for(lambda: job.id in delivery.posting)
        await core.dispatcher.stop()
        await assert_succeeded_undelivered(core, job.id)
    async with running_core(db_url, tmp_path) as (core, delivery):
        await delivery.wait_for(lambda: job.id in delivery.succeeded)
        [(view, _images)] = delivery.succeeded[job.id]
        assert view.delivery_attempt == 2  # the adapter looks for the cut-off post before posting


async def test_a_job_finishing_after_its_adapter_closed_is_left_for_the_next_start(db_url, tmp_path):
    """The old order of a stop closed the adapters first: a job that finished in between found no
    delivery registered and was marked delivered with an error, so nobody ever delivered it."""
    backend = FakeBackend()
    async with running_core(db_url, tmp_path, backend=backend) as (core, delivery):
        backend.hold()
        job = await core.service.imagine(ALICE, GUILD, "outlived its adapter", idempotency_key="late")
        await delivery.wait_for(lambda: backend.in_flight == 1)
        core.service.unregister_delivery("discord")  # what an adapter's close does
        backend.release()
        await core.service.wait_for_job(job.id, 30)
        await delivery.wait_for(lambda: job.id not in core.dispatcher._tasks)
        await assert_succeeded_undelivered(core, job.id)
    async with running_core(db_url, tmp_path) as (core, delivery):
        await delivery.wait_for(lambda: job.id in delivery.succeeded)
        assert len(delivery.succeeded[job.id]) == 1 and job.id not in delivery.failed


async def test_a_cancelled_caller_waits_for_its_transactions_end_only_so_long(monkeypatch):
    """The end of a transaction runs on when its caller is cancelled, but a database that never
    answers (a hung commit) does not hold a stop forever: after END_WITHIN_S the end is cut off
    and the cancellation reaches the caller."""
    from bot.core import db as db_module

    monkeypatch.setattr(db_module, "END_WITHIN_S", 0.2)
    ended, hung = asyncio.Event(), asyncio.Event()

    async def quick_end() -> None:
        await asyncio.sleep(0.05)
        ended.set()

    async def hung_end() -> None:
        hung.set()
        await asyncio.Event().wait()

    async def cancelled_while(step: Any) -> None:
        caller = asyncio.create_task(db_module._uninterrupted(step))
        await asyncio.sleep(0)
        caller.cancel()
        async with asyncio.timeout(10):
            with pytest.raises(asyncio.CancelledError):
                await caller

    await cancelled_while(quick_end())
    assert ended.is_set()  # the end ran to its end despite the cancellation
    await cancelled_while(hung_end())  # cut off after END_WITHIN_S: the caller hears its cancel
    assert hung.is_set()
