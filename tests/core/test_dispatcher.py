"""The dispatcher on a real database: fairness, queue positions, progress throttling, platform
filtering, several dispatchers sharing one database, and recovery after a crash or a restart."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func, select, update

from bot.backends.fake import FakeBackend
from bot.core.api import Actor, JobView, Place
from bot.core.dispatcher import _image_size
from bot.core.models import ImageRow, Job
from tests.core.helpers import (
    ALICE,
    BOB,
    GUILD,
    RecordingDelivery,
    assert_succeeded_undelivered,
    running_core,
)

REPO = Path(__file__).resolve().parents[2]


async def test_one_users_burst_does_not_starve_another(db_url, tmp_path):
    backend = FakeBackend()
    async with running_core(
        db_url, tmp_path, backend=backend, deliver=(), bot={"dispatch_concurrency": 1}
    ) as (
        core,
        delivery,
    ):
        burst = [
            await core.service.imagine(ALICE, GUILD, f"alice {i}", idempotency_key=f"a{i}") for i in range(20)
        ]
        single = await core.service.imagine(BOB, GUILD, "bob's only job", idempotency_key="b0")
        carol = Actor("discord", "carol", "Carol")
        other = await core.service.imagine(carol, GUILD, "carol's job", idempotency_key="c0")
        core.service.register_delivery("discord", delivery)  # now the dispatcher may claim
        for job in (single, other, burst[-1]):
            assert (await core.service.wait_for_job(job.id, 60)).state == "succeeded"
        order = [c.params.prompt for c in backend.calls]
        assert len(order) == 22
        # Round-robin: each user's first job before anybody's second.
        assert set(order[:3]) == {"alice 0", "bob's only job", "carol's job"}
        assert [p for p in order if p.startswith("alice")] == [f"alice {i}" for i in range(20)]


async def test_jobs_carry_their_fair_order_to_the_server_as_priority(db_url, tmp_path):
    """A user's older jobs still running set the priority the continuous engine admits by."""
    backend = FakeBackend()
    backend.hold()
    async with running_core(
        db_url, tmp_path, backend=backend, deliver=(), bot={"dispatch_concurrency": 4}
    ) as (core, delivery):
        alice = [
            await core.service.imagine(ALICE, GUILD, f"alice {i}", idempotency_key=f"a{i}") for i in range(3)
        ]
        bob = await core.service.imagine(BOB, GUILD, "bob's only job", idempotency_key="b0")
        core.service.register_delivery("discord", delivery)
        await delivery.wait_for(lambda: len(backend.calls) == 4)
        backend.release()
        for job in (*alice, bob):
            assert (await core.service.wait_for_job(job.id, 30)).state == "succeeded"
        priority = {c.params.prompt: c.params.priority for c in backend.calls}
        assert priority == {"alice 0": 0, "alice 1": 1, "alice 2": 2, "bob's only job": 0}


async def test_queue_positions_are_reported_when_they_change(db_url, tmp_path):
    backend = FakeBackend()
    backend.hold()
    async with running_core(db_url, tmp_path, backend=backend, bot={"dispatch_concurrency": 1}) as (
        core,
        delivery,
    ):
        jobs = [await core.service.imagine(ALICE, GUILD, f"p{i}", idempotency_key=f"q{i}") for i in range(3)]
        await delivery.wait_for(
            lambda: {("queued", jobs[2].id, 2), ("queued", jobs[1].id, 1)} <= set(delivery.events)
        )
        backend.release()
        for job in jobs:
            assert (await core.service.wait_for_job(job.id, 30)).state == "succeeded"
        positions = [e[2] for e in delivery.events if e[0] == "queued" and e[1] == jobs[2].id]
        assert positions[0] == 2 and positions == sorted(positions, reverse=True)
        assert len(positions) == len(set(positions))  # never the same position twice
        # The first job starts at once (at most a glimpse of position 1 before its claim).
        assert {e[2] for e in delivery.events if e[0] == "queued" and e[1] == jobs[0].id} <= {1}


async def test_jobs_queued_just_after_a_position_report_learn_theirs_without_waiting_for_the_poll(
    db_url, tmp_path
):
    """New jobs' positions go out at most every NEW_POSITION_INTERVAL_S; a job queued inside that
    window is told when it ends, not at the next poll (an hour here) or whenever a job finishes."""
    backend = FakeBackend()
    backend.hold()
    async with running_core(
        db_url,
        tmp_path,
        backend=backend,
        bot={"dispatch_concurrency": 1, "poll_interval_s": 3600.0, "progress_interval_s": 3600.0},
    ) as (core, delivery):
        first = await core.service.imagine(ALICE, GUILD, "p0", idempotency_key="n0")
        await delivery.wait_for(lambda: len(backend.calls) == 1)
        # Two more at once: the second's wake-up comes inside the interval the first's report opened.
        second = await core.service.imagine(ALICE, GUILD, "p1", idempotency_key="n1")
        third = await core.service.imagine(ALICE, GUILD, "p2", idempotency_key="n2")
        await delivery.wait_for(
            lambda: {("queued", second.id, 1), ("queued", third.id, 2)} <= set(delivery.events), within_s=60
        )
        assert len(backend.calls) == 1  # told while the first job still runs
        backend.release()
        for job in (first, second, third):
            assert (await core.service.wait_for_job(job.id, 30)).state == "succeeded"


async def test_progress_is_throttled(sqlite_url, tmp_path):
    backend = FakeBackend(delay_s=0.3)  # 30 steps, one every 10 ms
    async with running_core(sqlite_url, tmp_path, backend=backend, bot={"progress_interval_s": 60.0}) as (
        core,
        delivery,
    ):
        job = await core.service.imagine(ALICE, GUILD, "x --steps 30", idempotency_key="t")
        await core.service.wait_for_job(job.id, 30)
        await delivery.wait_for(lambda: job.id in delivery.succeeded)
        steps = [e[2] for e in delivery.events if e[0] == "progress"]
        assert steps == [0, 30]  # start and the final step; the 29 in between were throttled


async def test_previews_are_throttled_and_only_the_first_images(sqlite_url, tmp_path):
    backend = FakeBackend(delay_s=0.3, preview_every=1)  # 30 steps, a preview of each image per step
    async with running_core(sqlite_url, tmp_path, backend=backend, bot={"preview_interval_s": 60.0}) as (
        core,
        delivery,
    ):
        job = await core.service.imagine(ALICE, GUILD, "x --steps 30 --n 2", idempotency_key="p")
        await core.service.wait_for_job(job.id, 30)
        await delivery.wait_for(lambda: job.id in delivery.succeeded)
        previews = [e for e in delivery.events if e[0] == "preview"]
        # The first preview goes out; the other 57 (28 steps x 2 images, and image 1's) wait 60 s.
        assert [(e[2], e[3]) for e in previews] == [(1, 30)]
        assert previews[0][4].startswith(b"\x89PNG")
        kinds = [e[0] for e in delivery.events if e[1] == job.id]
        assert kinds.index("preview") < kinds.index("succeeded")


async def test_previews_off_when_the_interval_is_zero(sqlite_url, tmp_path):
    backend = FakeBackend(preview_every=1)
    async with running_core(sqlite_url, tmp_path, backend=backend, bot={"preview_interval_s": 0}) as (
        core,
        delivery,
    ):
        job = await core.service.imagine(ALICE, GUILD, "x --steps 5", idempotency_key="p0")
        await core.service.wait_for_job(job.id, 30)
        await delivery.wait_for(lambda: job.id in delivery.succeeded)
        assert [e for e in delivery.events if e[0] == "preview"] == []


async def test_only_platforms_with_a_delivery_are_claimed(db_url, tmp_path):
    async with running_core(db_url, tmp_path, deliver=("slack",)) as (core, delivery):
        discord_job = await core.service.imagine(ALICE, GUILD, "d", idempotency_key="d")
        slack = Actor("slack", "U1", "u")
        slack_job = await core.service.imagine(slack, Place("slack", "T1", "C1"), "s", idempotency_key="s")
        assert (await core.service.wait_for_job(slack_job.id, 30)).state == "succeeded"
        await asyncio.sleep(0.3)
        assert (await core.service.get_job(discord_job.id)).state == "queued"
        assert list(delivery.succeeded) == [slack_job.id]


async def test_two_dispatchers_share_the_database_each_job_runs_once(db_url, tmp_path):
    b1, b2 = FakeBackend(delay_s=0.01), FakeBackend(delay_s=0.01)
    # Both backends hold their jobs until each dispatcher runs some: a few jobs each at a time, so
    # neither can take all 30, whichever of the two this (maybe loaded) machine happens to favour.
    b1.hold()
    b2.hold()
    async with (
        running_core(db_url, tmp_path, backend=b1, owner="one") as (core1, d1),
        running_core(db_url, tmp_path, backend=b2, owner="two") as (core2, d2),
    ):
        users = [Actor("discord", f"u{i}", "") for i in range(6)]
        jobs = await asyncio.gather(
            *[
                (core1 if i % 2 else core2).service.imagine(
                    users[i % 6], GUILD, f"p{i}", idempotency_key=f"k{i}"
                )
                for i in range(30)
            ]
        )
        await d1.wait_for(lambda: bool(b1.calls and b2.calls))
        b1.release()
        b2.release()
        for job in jobs:
            assert (await core1.service.wait_for_job(job.id, 60)).state == "succeeded"
        await d1.wait_for(lambda: len(d1.succeeded) + len(d2.succeeded) == 30)
        ran = [c.params.prompt for c in b1.calls + b2.calls]
        assert sorted(ran) == sorted(f"p{i}" for i in range(30))  # each exactly once
        assert not set(d1.succeeded) & set(d2.succeeded)  # each delivered by one process
        assert all(len(v) == 1 for d in (d1, d2) for v in d.succeeded.values())
        assert b1.calls and b2.calls  # both did work


async def test_crashed_dispatcher_job_is_taken_over_after_the_lease(db_url, tmp_path):
    """Simulate a process that died holding a claim: its lease expires and another one finishes."""
    async with running_core(db_url, tmp_path, bot={"lease_s": 1.0}, start=False) as (core, delivery):
        job = await core.service.imagine(ALICE, GUILD, "x --n 2", idempotency_key="crash")
        async with core.db.session() as s:  # the dead process's claim
            await s.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(state="running", lease_owner="dead:1", lease_until=core.service.clock(), attempts=1)
            )
        core.dispatcher.start()
        done = await core.service.wait_for_job(job.id, 30)
        assert done.state == "succeeded" and done.attempts == 2
        await delivery.wait_for(lambda: job.id in delivery.succeeded)
        assert len(delivery.succeeded[job.id]) == 1 and len(core.backend.calls) == 1


async def test_result_stored_but_not_delivered_is_delivered_once(db_url, tmp_path):
    async with running_core(db_url, tmp_path, bot={"lease_s": 1.0}) as (core, delivery):
        job = await core.service.imagine(ALICE, GUILD, "x", idempotency_key="undelivered")
        await core.service.wait_for_job(job.id, 30)
        async with core.db.session() as s:  # as if the process died between storing and delivering
            await s.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(delivered_at=None, lease_owner="dead:2", lease_until=core.service.clock())
            )
        delivery.succeeded.clear()
        core.service.wake()
        await delivery.wait_for(lambda: job.id in delivery.succeeded)
        await asyncio.sleep(0.3)
        assert len(delivery.succeeded[job.id]) == 1
        assert len(core.backend.calls) == 1  # not generated again
        assert (await core.service.get_job(job.id)).state == "succeeded"


async def test_graceful_stop_hands_running_jobs_back(db_url, tmp_path):
    backend = FakeBackend()
    backend.hold()
    async with running_core(db_url, tmp_path, backend=backend) as (core, delivery):
        job = await core.service.imagine(ALICE, GUILD, "x", idempotency_key="stop")
        await delivery.wait_for(lambda: ("progress", job.id, 0, 20) in delivery.events)
        await core.dispatcher.stop()
        view = await core.service.get_job(job.id)
        assert (view.state, view.attempts) == ("queued", 0)
    async with running_core(db_url, tmp_path) as (core, delivery):  # the next start finishes it
        assert (await core.service.wait_for_job(job.id, 30)).state == "succeeded"
        await delivery.wait_for(lambda: job.id in delivery.succeeded)


async def test_a_delivery_cut_off_by_its_adapter_closing_is_left_for_the_next_start(db_url, tmp_path):
    """At shutdown the adapter closes its HTTP session before the dispatcher stops: a delivery
    still retrying then fails with "Session is closed". That is no verdict on the delivery: the
    job stays undelivered and the next process delivers it, once."""

    class ClosingAdapter(RecordingDelivery):
        def __init__(self, core: Any) -> None:
            super().__init__()
            self.core = core

        async def on_succeeded(self, job: JobView, images: Any) -> None:
            self.core.service.unregister_delivery("discord")  # what the adapter's close() does
            self.events.append(("cut off", job.id))
            self._changed.set()
            raise RuntimeError("Session is closed")

    async with running_core(db_url, tmp_path, deliver=()) as (core, _):
        closing = ClosingAdapter(core)
        core.service.register_delivery("discord", closing)
        job = await core.service.imagine(ALICE, GUILD, "x", idempotency_key="cut")
        await closing.wait_for(lambda: ("cut off", job.id) in closing.events)
        await core.dispatcher.stop()
        await assert_succeeded_undelivered(core, job.id)
    async with running_core(db_url, tmp_path) as (core, delivery):  # the next start delivers it
        await delivery.wait_for(lambda: job.id in delivery.succeeded)
        await asyncio.sleep(0.3)
        assert len(delivery.succeeded[job.id]) == 1 and len(core.backend.calls) == 0


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from bot.backends.fake import FakeBackend
    from tests.core.helpers import ALICE, GUILD, running_core

    async def main(url, tmp):
        backend = FakeBackend()
        backend.hold()  # never finishes: we are killed mid-job
        async with running_core(url, __import__("pathlib").Path(tmp), backend=backend,
                                bot={"lease_s": 600.0}) as (core, delivery):
            job = await core.service.imagine(ALICE, GUILD, "killed mid-job --n 2", idempotency_key="kill")
            await delivery.wait_for(lambda: any(e[0] == "progress" for e in delivery.events))
            print("RUNNING", job.id, flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_killed_process_job_finishes_exactly_once_after_restart(db_url, tmp_path):
    """A real bot process is SIGKILLed while its job runs; a new process finishes it exactly once.
    The dead process held a 10-minute lease: the new one sees that the owner's pid on this host is
    gone and takes the job over at once."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WORKER,
        db_url,
        str(tmp_path),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line.startswith("RUNNING"):
            proc.kill()
            err = (await proc.stderr.read()).decode()
            raise AssertionError(f"worker did not start its job: {line!r}\n{err[-3000:]}")
        job_id = int(line.split()[1])
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)  # no clean-up: the claim stays behind as after a crash
        await proc.wait()
    async with running_core(db_url, tmp_path) as (core, delivery):
        before = await core.service.get_job(job_id)
        assert before.state == "running"  # the dead process's claim is still there
        done = await core.service.wait_for_job(job_id, 30)
        assert done.state == "succeeded" and len(done.images) == 2
        await delivery.wait_for(lambda: job_id in delivery.succeeded)
        await asyncio.sleep(0.5)
        assert len(delivery.succeeded[job_id]) == 1 and len(core.backend.calls) == 1
        async with core.db.read() as s:
            assert (await s.execute(select(func.count()).select_from(ImageRow))).scalar_one() == 2
        assert (await core.service.quota(ALICE, GUILD)).used_today == 2  # charged once


async def test_a_job_longer_than_the_lease_is_not_taken_over(db_url, tmp_path):
    """The holder renews its lease while the job runs, so a second dispatcher never steals it.

    The job is held until its first lease has certainly run out (a lease and a second after the
    job was seen running: later on a slower machine, never sooner). The leases are renewed every
    third of a lease by a task of their own; the lease is 6 s so that a loaded test machine, which
    can stall this process for seconds, does not make a legitimate takeover (the holder really
    went silent for a lease) look like a wrongful one."""
    lease_s = 6.0
    b1, b2 = FakeBackend(), FakeBackend()
    b1.hold()
    b2.hold()
    async with (
        running_core(db_url, tmp_path, backend=b1, owner="one", bot={"lease_s": lease_s}) as (core1, d1),
        running_core(db_url, tmp_path, backend=b2, owner="two", bot={"lease_s": lease_s}) as (core2, d2),
    ):
        job = await core1.service.imagine(ALICE, GUILD, "slow --steps 5", idempotency_key="long")
        await d1.wait_for(lambda: bool(b1.calls or b2.calls))  # either dispatcher may claim it
        await asyncio.sleep(lease_s + 1.0)  # past the first lease's end: renewed, or taken over
        b1.release()
        b2.release()
        done = await core1.service.wait_for_job(job.id, 60)
        assert done.state == "succeeded" and done.attempts == 1
        assert len(b1.calls) + len(b2.calls) == 1
        assert len(d1.succeeded.get(job.id, [])) + len(d2.succeeded.get(job.id, [])) == 1


def _encoded(size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_a_result_s_size_is_read_from_its_header():
    """A PNG's size comes from its IHDR chunk (no PIL open per result); other formats go through
    PIL; bytes that are no image give None (the requested size is recorded instead)."""
    assert _image_size(_encoded((64, 48), "PNG")) == (64, 48)
    assert _image_size(_encoded((33, 17), "JPEG")) == (33, 17)
    assert _image_size(b"not an image") is None
    assert _image_size(_encoded((64, 48), "PNG")[:20]) is None  # cut inside the header
