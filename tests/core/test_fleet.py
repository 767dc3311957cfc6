"""The core over a fleet of inference servers (loopback fakes of the server's API): dispatch
concurrency that follows the servers' capacity, and jobs that wait out an outage (shown to the
user) up to `outage_horizon_s`, then fail with a refund. No timings: counts and messages."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import socket
from collections.abc import AsyncIterator

from sqlalchemy import update

from bot.backends.inference_server import InferenceServerBackend
from bot.config import BotConfig
from bot.core.concurrency import dispatch_concurrency
from bot.core.models import DispatcherHeartbeat, Job
from tests.backends.fakes import TOKEN, FakeInferenceServer, error, start
from tests.core.helpers import ALICE, GUILD, running_core


@contextlib.asynccontextmanager
async def serving(fake: FakeInferenceServer) -> AsyncIterator[FakeInferenceServer]:
    server = await start(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    try:
        yield fake
    finally:
        await server.close()


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_concurrency_follows_capacity_unless_set():
    assert dispatch_concurrency(BotConfig(), None) == 4  # nothing reported yet
    assert dispatch_concurrency(BotConfig(), 3) == 6  # a running batch and the next one
    assert dispatch_concurrency(BotConfig(max_dispatch_concurrency=10), 16) == 10
    assert dispatch_concurrency(BotConfig(dispatch_concurrency=2), 16) == 2


def test_busy_dispatchers_share_the_capacity():
    assert dispatch_concurrency(BotConfig(), 3, dispatchers=2) == 3  # 6 in flight in all, not 12
    assert dispatch_concurrency(BotConfig(), 3, dispatchers=4) == 2  # rounded up: 8, not 24
    assert dispatch_concurrency(BotConfig(), 1, dispatchers=5) == 1  # never none
    assert dispatch_concurrency(BotConfig(), None, dispatchers=3) == 4  # nothing to share yet
    assert (
        dispatch_concurrency(BotConfig(dispatch_concurrency=5), 16, dispatchers=4) == 5
    )  # fixed: per process


async def test_the_dispatcher_sends_as_many_jobs_as_the_servers_can_batch(db_url, tmp_path):
    release = asyncio.Event()
    arrived: list[str] = []

    async def held(request, body):
        arrived.append(body["prompt"])
        await release.wait()
        return error(503, "overloaded", "never mind")  # replaced below by a success

    a, b = FakeInferenceServer(load=(0, 0, 2)), FakeInferenceServer(load=(0, 0, 1))
    async with serving(a), serving(b):
        a.script, b.script = [held] * 20, [held] * 20
        backend = InferenceServerBackend([a.url, b.url], token=TOKEN, max_retries=0)
        async with running_core(db_url, tmp_path, backend=backend, quotas={"daily_limit": 50}) as (
            core,
            delivery,
        ):
            assert backend.capacity() == 3  # read from both servers' /health at start-up
            for i in range(10):
                await core.service.imagine(ALICE, GUILD, f"p{i}", idempotency_key=f"k{i}")
            await delivery.wait_for(lambda: len(arrived) >= 6)
            await asyncio.sleep(0.5)  # room for a seventh, which must not come (no timing asserted)
            assert len(arrived) == 6  # 2 x (2 + 1), not the old fixed 4
            # Least outstanding work per capacity: a (batch 2) got two for each of b's.
            assert (len(a.seen), len(b.seen)) == (4, 2)
            a.script.clear()
            b.script.clear()
            release.set()


async def test_a_second_busy_dispatcher_halves_the_share_of_the_servers(db_url, tmp_path):
    """Another live bot process running jobs on the same servers (its heartbeat and a running job,
    written here as that process would) halves what this one sends; when it goes idle this one
    takes the whole capacity again."""
    release = asyncio.Event()
    arrived: list[str] = []

    async def held(request, body):
        arrived.append(body["prompt"])
        await release.wait()
        return error(503, "overloaded", "never mind")

    a, b = FakeInferenceServer(load=(0, 0, 2)), FakeInferenceServer(load=(0, 0, 1))
    async with serving(a), serving(b):
        a.script, b.script = [held] * 20, [held] * 20
        backend = InferenceServerBackend([a.url, b.url], token=TOKEN, max_retries=0)
        # A beat (and a count of the busy dispatchers) every 0.5 s.
        fast = {"lease_s": 6.0, "poll_interval_s": 0.25}
        async with running_core(db_url, tmp_path, backend=backend, bot=fast, quotas={"daily_limit": 50}) as (
            core,
            delivery,
        ):
            core.service.unregister_delivery("discord")  # the other process's job stays its own
            theirs = await core.service.imagine(ALICE, GUILD, "theirs", idempotency_key="o0")
            now = core.service.clock()
            async with core.db.session() as s:
                await s.execute(
                    update(Job)
                    .where(Job.id == theirs.id)
                    .values(state="running", lease_owner="bot-2:1:x", lease_until=now + dt.timedelta(hours=1))
                )
                s.add(DispatcherHeartbeat(owner="bot-2:1:x", beat_at=now))

            async def beat_as_the_other_process() -> None:
                # It stays alive for the whole test: one beat would make it dead after 10 s
                # (MIN_STALE_S), which a loaded machine can reach before the checks below.
                while True:
                    await asyncio.sleep(0.5)
                    async with core.db.session() as s:
                        await s.execute(
                            update(DispatcherHeartbeat)
                            .where(DispatcherHeartbeat.owner == "bot-2:1:x")
                            .values(beat_at=core.service.clock())
                        )

            beating = asyncio.create_task(beat_as_the_other_process())
            try:
                await delivery.wait_for(lambda: core.dispatcher.concurrency == 3)  # ceil(2 x 3 / 2)
                core.service.register_delivery("discord", delivery)
                for i in range(10):
                    await core.service.imagine(ALICE, GUILD, f"p{i}", idempotency_key=f"k{i}")
                await delivery.wait_for(lambda: len(arrived) >= 3)
                await asyncio.sleep(0.5)  # room for a fourth, which must not come (no timing asserted)
                assert len(arrived) == 3
                async with core.db.session() as s:  # the other process finished its job: idle now
                    await s.execute(
                        update(Job).where(Job.id == theirs.id).values(state="succeeded", lease_owner=None)
                    )
                await delivery.wait_for(lambda: len(arrived) >= 6)
                await asyncio.sleep(0.5)
                assert len(arrived) == 6 and core.dispatcher.concurrency == 6
            finally:  # also when an assertion failed: no task left beating into the next test
                beating.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beating
            a.script.clear()
            b.script.clear()
            release.set()


async def test_an_outage_longer_than_the_retry_budget_fails_no_job(db_url, tmp_path):
    async def restarting(request, body):
        return error(503, "not_ready", "the model is loading", headers={"Retry-After": "0"})

    fake = FakeInferenceServer()
    async with serving(fake):
        # Ten refusals: twice the 5 attempts of the usual rounds (max_retries = 4).
        fake.script = [restarting] * 10
        backend = InferenceServerBackend(
            [fake.url],
            token=TOKEN,
            max_retries=4,
            backoff_base_s=0.01,
            backoff_max_s=0.02,
            outage_horizon_s=600,
        )
        async with running_core(db_url, tmp_path, backend=backend, bot={"progress_interval_s": 0}) as (
            core,
            delivery,
        ):
            job = await core.service.imagine(ALICE, GUILD, "patient", idempotency_key="o1")
            done = await core.service.wait_for_job(job.id, 60)
            assert done.state == "succeeded" and done.attempts == 1
            assert len(fake.seen) == 11
            waiting = [e for e in delivery.events if e[0] == "waiting" and e[1] == job.id]
            assert waiting and "waiting for an image server" in waiting[0][2]


async def test_an_outage_past_the_horizon_fails_the_job_with_a_refund(db_url, tmp_path):
    backend = InferenceServerBackend(
        [refused_url()],
        token=TOKEN,
        max_retries=1,
        backoff_base_s=0.05,
        backoff_max_s=0.1,
        outage_horizon_s=1.0,
    )
    async with running_core(db_url, tmp_path, backend=backend, quotas={"daily_limit": 1}) as (core, delivery):
        job = await core.service.imagine(ALICE, GUILD, "x", idempotency_key="h1")
        done = await core.service.wait_for_job(job.id, 60)
        assert done.state == "failed" and done.attempts == 1  # waited once; not requeued to wait again
        await delivery.wait_for(lambda: job.id in delivery.failed)
        message = delivery.failed[job.id][0][1]
        assert message.startswith("No image server has been reachable for") and "refunded" in message
        assert any(e[0] == "waiting" and e[1] == job.id for e in delivery.events)
        assert (await core.service.quota(ALICE, GUILD)).remaining == 1


async def test_every_tile_of_an_upscale_shows_its_wait_for_a_server(db_url, tmp_path):
    """A tiled upscale is one request per tile: a server restart may fall in any of them, and the
    user sees each wait (not only one in the first tile), between the tiles' progress."""

    async def restarting(request, body):
        return error(503, "not_ready", "the model is loading", headers={"Retry-After": "0"})

    fake = FakeInferenceServer()
    async with serving(fake):
        backend = InferenceServerBackend(
            [fake.url], token=TOKEN, max_retries=0, backoff_base_s=0.01, backoff_max_s=0.02
        )
        async with running_core(
            db_url, tmp_path, backend=backend, bot={"progress_interval_s": 0, "max_side": 64}
        ) as (core, delivery):
            parent = await core.service.imagine(ALICE, GUILD, "a lighthouse --steps 2", idempotency_key="p")
            parent = await core.service.wait_for_job(parent.id, 30)
            assert parent.state == "succeeded"
            tiles = 4  # a 128x128 upscale in 64x64 tiles
            fake.script = [restarting, "ok"] * tiles  # each tile's request first meets a restart
            up = await core.service.upscale(ALICE, GUILD, 0, job_id=parent.id, idempotency_key="u")
            done = await core.service.wait_for_job(up.id, 60)
            assert done.state == "succeeded" and done.attempts == 1
            events = [e[0] for e in delivery.events if e[1] == up.id and e[0] in ("waiting", "progress")]
            # Step 0 when the job starts, then one wait before each tile's steps.
            periods = [kind for kind, _ in itertools.groupby(events)]
            assert periods == ["progress"] + ["waiting", "progress"] * tiles, events
