"""Submissions first (`bot.core.submit_activity`): a dispatcher's round waits while submissions
are in progress in its process, or while another process announces a storm of them, and the wait
is bounded, so dispatch is deferred, never starved."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from bot.backends.fake import FakeBackend
from bot.core import dispatcher as dispatcher_module
from bot.core.fair_queue import JOBS_CHANNEL
from bot.core.submit_activity import STORM, STORM_SUBMISSIONS, SubmitActivity
from tests.core.helpers import ALICE, BOB, GUILD, running_core


async def until(predicate, within_s: float = 30.0) -> None:  # noqa: ANN001
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 - the state changes on the same loop
            await asyncio.sleep(0.01)


async def test_every_job_creating_entry_point_is_counted_while_it_runs(sqlite_url, tmp_path):
    async with running_core(sqlite_url, tmp_path, start=False) as (core, _):
        activity = core.service.activity
        assert not activity.busy
        task = asyncio.create_task(core.service.imagine(ALICE, GUILD, "a fox", idempotency_key="k1"))
        await asyncio.sleep(0)  # the task starts
        assert activity.busy
        view = await task
        assert not activity.busy and view.created
        with pytest.raises(Exception):  # noqa: B017 - a refusal: counted until it is refused too
            await core.service.imagine(ALICE, GUILD, "", idempotency_key="k2")
        assert not activity.busy


async def test_the_dispatcher_waits_for_a_submission_in_progress(db_url, tmp_path, monkeypatch):
    # Only the submission's end can end the wait here.
    monkeypatch.setattr(dispatcher_module, "SUBMISSIONS_FIRST_S", 600.0)
    async with running_core(db_url, tmp_path, backend=FakeBackend()) as (core, _):
        activity = core.service.activity
        release = asyncio.Event()
        held = asyncio.create_task(activity.counted(release.wait)())
        await asyncio.sleep(0)
        job = await core.service.imagine(ALICE, GUILD, "waits its turn", idempotency_key="k1")
        await until(lambda: activity.waiting > 0)  # the round the submission woke is waiting
        assert (await core.service.get_job(job.id)).state == "queued"
        release.set()
        await held
        assert (await core.service.wait_for_job(job.id, 60)).state == "succeeded"


async def test_a_storm_that_never_pauses_still_lets_the_dispatcher_claim(db_url, tmp_path, monkeypatch):
    monkeypatch.setattr(dispatcher_module, "SUBMISSIONS_FIRST_S", 0.2)
    async with running_core(db_url, tmp_path, backend=FakeBackend()) as (core, _):
        forever = asyncio.Event()
        held = asyncio.create_task(core.service.activity.counted(forever.wait)())
        try:
            jobs = [
                await core.service.imagine(BOB, GUILD, f"job {i}", idempotency_key=f"b{i}") for i in range(3)
            ]
            for job in jobs:
                assert (await core.service.wait_for_job(job.id, 60)).state == "succeeded"
            assert core.service.activity.busy  # still "submitting" throughout
        finally:
            held.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await held


async def test_quiet_returns_at_once_when_idle_and_when_the_last_submission_ends():
    activity = SubmitActivity()
    await asyncio.wait_for(activity.quiet(600.0), 5)  # idle: no wait at all
    release = asyncio.Event()
    held = [asyncio.create_task(activity.counted(release.wait)()) for _ in range(2)]
    await asyncio.sleep(0)
    waiter = asyncio.create_task(activity.quiet(600.0))
    await asyncio.sleep(0)
    assert activity.waiting == 1 and not waiter.done()
    release.set()
    await asyncio.wait_for(waiter, 5)
    await asyncio.gather(*held)
    assert activity.waiting == 0 and not activity.busy
    # Bounded: a submission that never ends holds nobody longer than asked.
    forever = asyncio.Event()
    stuck = asyncio.create_task(activity.counted(forever.wait)())
    await asyncio.sleep(0)
    await asyncio.wait_for(activity.quiet(0.05), 5)
    assert activity.waiting == 0
    stuck.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stuck


async def test_a_storm_is_many_submissions_started_close_together():
    activity = SubmitActivity()
    done = asyncio.Event()
    done.set()
    for _ in range(STORM_SUBMISSIONS - 1):
        await activity.counted(done.wait)()
    assert not activity.storming()  # ordinary traffic, however close together
    await activity.counted(done.wait)()
    assert activity.storming()


@pytest.mark.postgres
async def test_other_processes_hear_of_a_storm_in_the_notification(pg_session_url, tmp_path):
    from tests.core.conftest import truncate

    await truncate(pg_session_url)
    payloads: list[str] = []
    dsn = make_url(pg_session_url).set(drivername="postgresql").render_as_string(hide_password=False)
    listener = await asyncpg.connect(dsn)
    try:
        await listener.add_listener(JOBS_CHANNEL, lambda *args: payloads.append(args[3]))
        # No dispatcher here: this process only submits, as a chat process beside dispatchers does.
        async with running_core(pg_session_url, tmp_path, start=False) as (core, _):
            await core.service.imagine(ALICE, GUILD, "alone", idempotency_key="lone")
            await until(lambda: len(payloads) == 1)
            assert payloads == [""]  # a lone submission: dispatchers claim at once
            users = [ALICE.__class__("discord", f"u{i}", f"U{i}") for i in range(3 * STORM_SUBMISSIONS)]
            await asyncio.gather(
                *[core.service.imagine(u, GUILD, "storm", idempotency_key=f"s-{u.user_id}") for u in users]
            )
            await until(lambda: STORM in payloads)
    finally:
        await listener.close()


@pytest.mark.postgres
async def test_a_dispatcher_that_hears_of_a_storm_defers_for_a_bounded_time(
    pg_session_url, tmp_path, monkeypatch
):
    from tests.core.conftest import truncate

    await truncate(pg_session_url)
    monkeypatch.setattr(dispatcher_module, "STORM_HOLD_S", 600.0)
    monkeypatch.setattr(dispatcher_module, "SUBMISSIONS_FIRST_S", 0.2)
    async with running_core(pg_session_url, tmp_path, backend=FakeBackend()) as (core, _):
        core.dispatcher._notified(STORM)  # as the listener hands it over
        job = await core.service.imagine(ALICE, GUILD, "after the storm", idempotency_key="k")
        # The hold outlasts the test; the bound ends each round's wait.
        assert (await core.service.wait_for_job(job.id, 60)).state == "succeeded"


@pytest.mark.postgres
async def test_a_dispatcher_that_hears_of_a_storm_lets_it_go_first(pg_session_url, tmp_path, monkeypatch):
    from tests.core.conftest import truncate

    await truncate(pg_session_url)
    monkeypatch.setattr(dispatcher_module, "STORM_HOLD_S", 600.0)
    monkeypatch.setattr(dispatcher_module, "SUBMISSIONS_FIRST_S", 600.0)
    async with running_core(pg_session_url, tmp_path, backend=FakeBackend()) as (core, _):
        core.dispatcher._notified(STORM)
        job = await core.service.imagine(ALICE, GUILD, "after the storm", idempotency_key="k")
        # Long enough for the fake backend to have run it, were the dispatcher not waiting (on a
        # slow machine this can only fail to notice a dispatcher that does not wait).
        await asyncio.sleep(0.5)
        assert (await core.service.get_job(job.id)).state == "queued"
