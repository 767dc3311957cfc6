"""Submitting jobs on a real database (SQLite file and PostgreSQL): quotas, idempotency, moderation,
results, refunds, variations, re-rolls and inpainting."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io

import pytest
from PIL import Image
from sqlalchemy import func, select

from bot.backends.base import BackendRejected, BackendUnavailable
from bot.backends.fake import FakeBackend
from bot.core.api import (
    Actor,
    BadParameters,
    Banned,
    Moderated,
    NotFound,
    Overloaded,
    Place,
    QuotaExceeded,
)
from bot.core.models import ImageRow, Job, QuotaUsage
from tests.core.helpers import ADMIN, ALICE, BOB, GUILD, running_core


async def test_imagine_runs_stores_and_delivers(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, delivery):
        job = await core.service.imagine(
            ALICE,
            GUILD,
            "a red fox --n 2 --seed 7 --ar 3:2",
            idempotency_key="evt-1",
            delivery={"token": "t"},
        )
        assert (job.state, job.created, job.params.seeds, job.params.width) == ("queued", True, (7, 8), 80)
        done = await core.service.wait_for_job(job.id, 30)
        assert done.state == "succeeded" and len(done.images) == 2
        await delivery.wait_for(lambda: job.id in delivery.succeeded)
        ((view, images),) = delivery.succeeded[job.id]
        assert view.delivery == {"token": "t"}
        assert [i.seed for i in images] == [7, 8]
        for img in images:
            assert img.info.storage_key == hashlib.sha256(img.png).hexdigest()
            assert await core.service.image_bytes(img.info.storage_key) == img.png
            assert Image.open(io.BytesIO(img.png)).size == (80, 56)
        # progress: a start event (step 0) first, the final step last
        steps = [e[2] for e in delivery.events if e[0] == "progress" and e[1] == job.id]
        assert steps[0] == 0 and steps[-1] == 20
        q = await core.service.quota(ALICE, GUILD)
        assert (q.used_today, q.remaining_today, q.limit_source) == (2, 23, "global")
        assert [j.id for j in await core.service.history(ALICE)] == [job.id]
        with pytest.raises(NotFound):
            await core.service.image_bytes("0" * 64)


async def test_same_idempotency_key_returns_the_same_job_once_charged(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        first = await core.service.imagine(ALICE, GUILD, "a cat --n 2", idempotency_key="evt-9")
        # A Slack retry / double click, also concurrently and with different text: same job.
        again = await asyncio.gather(
            *[core.service.imagine(ALICE, GUILD, "other --n 4", idempotency_key="evt-9") for _ in range(5)]
        )
        assert {j.id for j in again} == {first.id} and not any(j.created for j in again)
        assert (await core.service.quota(ALICE, GUILD)).used_today == 2
        # The key is per platform: the same id on Slack is another job.
        slack = Actor("slack", "alice", "Alice")
        other = await core.service.imagine(
            slack, Place("slack", "T1", "C1"), "a cat", idempotency_key="evt-9"
        )
        assert other.id != first.id
        async with core.db.read() as s:
            assert (await s.execute(select(func.count()).select_from(Job))).scalar_one() == 2


async def test_quota_race_exactly_limit_accepted(db_url, tmp_path):
    """50 simultaneous submissions from one user with a limit of 10: exactly 10 accepted."""
    async with running_core(db_url, tmp_path, start=False, quotas={"daily_limit": 10}) as (core, _):
        results = await asyncio.gather(
            *[core.service.imagine(ALICE, GUILD, f"fox {i}", idempotency_key=f"race-{i}") for i in range(50)],
            return_exceptions=True,
        )
        accepted = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(accepted) == 10
        assert len(refused) == 40 and all(isinstance(r, QuotaExceeded) for r in refused)
        async with core.db.read() as s:
            assert (await s.execute(select(func.count()).select_from(Job))).scalar_one() == 10
            assert (await s.execute(select(QuotaUsage.images_used))).scalar_one() == 10


async def test_quota_bonus_credits_reset_time_and_new_period(db_url, tmp_path):
    now = [dt.datetime(2026, 3, 1, 23, 30, tzinfo=dt.UTC)]

    def clock() -> dt.datetime:
        return now[0]

    async with running_core(db_url, tmp_path, start=False, clock=clock, quotas={"daily_limit": 3}) as (
        core,
        _,
    ):
        await core.service.imagine(ALICE, GUILD, "a --n 2", idempotency_key="q1")
        with pytest.raises(QuotaExceeded) as err:
            await core.service.imagine(ALICE, GUILD, "a --n 2", idempotency_key="q2")
        assert err.value.reset_at == dt.datetime(2026, 3, 2, 0, 0, tzinfo=dt.UTC)
        assert err.value.remaining == 1 and "2026-03-02 00:00 UTC" in err.value.message
        await core.service.grant_credits(ADMIN, "alice", 5)
        job = await core.service.imagine(ALICE, GUILD, "a --n 4", idempotency_key="q3")  # 1 daily + 3 credits
        q = await core.service.quota(ALICE, GUILD)
        assert (q.used_today, q.bonus_credits, q.remaining) == (3, 2, 2)
        async with core.db.read() as s:
            row = await s.get(Job, job.id)
            assert (row.quota_daily, row.quota_credits) == (1, 3)
        now[0] = dt.datetime(2026, 3, 2, 0, 0, 1, tzinfo=dt.UTC)  # UTC midnight: a fresh allowance
        q = await core.service.quota(ALICE, GUILD)
        assert (q.used_today, q.remaining) == (0, 5)


async def test_limit_precedence_user_over_guild_over_global(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False, quotas={"daily_limit": 5}) as (core, _):
        other_guild = Place("discord", "guild2", "c")
        await core.service.set_guild_limit(ADMIN, "guild1", 2)
        assert (await core.service.quota(ALICE, GUILD)).daily_limit == 2
        assert (await core.service.quota(ALICE, other_guild)).limit_source == "global"
        await core.service.set_user_limit(ADMIN, "alice", 1)
        q = await core.service.quota(ALICE, GUILD)
        assert (q.daily_limit, q.limit_source) == (1, "user")
        await core.service.imagine(ALICE, GUILD, "x", idempotency_key="a")
        with pytest.raises(QuotaExceeded):
            await core.service.imagine(ALICE, other_guild, "x", idempotency_key="b")
        await core.service.set_user_limit(ADMIN, "alice", None)
        assert (await core.service.quota(ALICE, GUILD)).limit_source == "guild"
        await core.service.set_user_limit(ADMIN, "alice", 0)
        with pytest.raises(QuotaExceeded):
            await core.service.imagine(ALICE, other_guild, "x", idempotency_key="c")


async def test_refusals_banned_moderated_overloaded(db_url, tmp_path):
    async with running_core(
        db_url, tmp_path, start=False, moderation={"banned_terms": ["gore"]}, bot={"max_queued_jobs": 2}
    ) as (core, _):
        with pytest.raises(Moderated) as err:
            await core.service.imagine(ALICE, GUILD, "so much GÔRE", idempotency_key="m1")
        assert err.value.rule == "banned term 'gore'" and "gore" in err.value.message
        # the negative prompt may name it
        await core.service.imagine(ALICE, GUILD, "a meadow --no gore", idempotency_key="m2")
        await core.service.ban(ADMIN, "bob", "spam")
        with pytest.raises(Banned) as berr:
            await core.service.imagine(BOB, GUILD, "a meadow", idempotency_key="b1")
        assert "spam" in berr.value.message
        await core.service.unban(ADMIN, "bob")
        await core.service.imagine(BOB, GUILD, "a meadow", idempotency_key="b2")
        with pytest.raises(Overloaded):
            await core.service.imagine(BOB, GUILD, "a meadow", idempotency_key="b3")
        # Nothing was charged for refused requests.
        assert (await core.service.quota(ALICE, GUILD)).used_today == 1
        assert (await core.service.quota(BOB, GUILD)).used_today == 1
        with pytest.raises(BadParameters) as perr:
            await core.service.imagine(ALICE, GUILD, "x --steps lots", idempotency_key="p1")
        assert perr.value.field == "steps"


async def test_failure_refunds_quota_and_tells_the_adapter(db_url, tmp_path):
    backend = FakeBackend()
    backend.fail_next(1, BackendRejected("prompt has unsupported characters", "prompt"))
    # One job at a time: the injected failure goes to the next call, which must be the first job's.
    one_at_a_time = {"dispatch_concurrency": 1}
    # The dispatcher starts after the charges are checked: else it may fail and refund the first
    # job before the check.
    async with running_core(
        db_url, tmp_path, backend=backend, quotas={"daily_limit": 4}, bot=one_at_a_time, start=False
    ) as (core, delivery):
        await core.service.grant_credits(ADMIN, "alice", 1)
        job = await core.service.imagine(ALICE, GUILD, "x --n 4", idempotency_key="f1")
        await core.service.imagine(ALICE, GUILD, "x", idempotency_key="f1b")  # 1 credit
        assert (await core.service.quota(ALICE, GUILD)).remaining == 0
        core.dispatcher.start()
        done = await core.service.wait_for_job(job.id, 30)
        assert done.state == "failed" and "refused" in done.error
        await delivery.wait_for(lambda: job.id in delivery.failed)
        assert len(delivery.failed[job.id]) == 1 and "refunded" in delivery.failed[job.id][0][1]
        q = await core.service.quota(ALICE, GUILD)
        # The failed job's 4 came back; the credit was the other job's.
        assert (q.used_today, q.bonus_credits) == (0, 0)


async def test_retryable_errors_are_retried_then_fail_with_refund(db_url, tmp_path):
    backend = FakeBackend()
    backend.fail_next(1, BackendUnavailable("server down"))
    async with running_core(db_url, tmp_path, backend=backend, bot={"max_attempts": 2}) as (core, delivery):
        job = await core.service.imagine(ALICE, GUILD, "x", idempotency_key="r1")
        done = await core.service.wait_for_job(job.id, 30)
        assert done.state == "succeeded" and done.attempts == 2
        backend.fail_next(2, BackendUnavailable("server down"))
        job2 = await core.service.imagine(ALICE, GUILD, "y", idempotency_key="r2")
        done2 = await core.service.wait_for_job(job2.id, 30)
        assert done2.state == "failed" and "unavailable" in done2.error
        assert (await core.service.quota(ALICE, GUILD)).used_today == 1


async def test_a_backends_retry_after_defers_the_retry_and_is_told_when_retries_run_out(db_url, tmp_path):
    backend = FakeBackend()
    backend.fail_next(1, BackendUnavailable("rate limited", retry_after_s=40))
    async with running_core(db_url, tmp_path, backend=backend, bot={"max_attempts": 2}) as (core, delivery):
        job = await core.service.imagine(ALICE, GUILD, "x", idempotency_key="ra1")
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            async with core.service.db.read() as s:
                row = (await s.execute(select(Job).where(Job.id == job.id))).scalar_one()
            if row.attempts == 1 and row.state == "queued" and row.not_before is not None:
                break
            assert asyncio.get_running_loop().time() < deadline, "the job was not requeued"
            await asyncio.sleep(0.05)
        # retry_backoff_s is 0 here: the 40 s are the backend's, not the dispatcher's backoff.
        wait = (row.not_before.replace(tzinfo=dt.UTC) - core.service.clock()).total_seconds()
        assert 35 < wait <= 40
        assert backend.pending_failures == 0 and len(backend.calls) == 1  # not retried meanwhile

    backend = FakeBackend()
    backend.fail_next(1, BackendUnavailable("rate limited", retry_after_s=150))
    async with running_core(db_url, tmp_path, backend=backend, bot={"max_attempts": 1}) as (core, delivery):
        job = await core.service.imagine(ALICE, GUILD, "y", idempotency_key="ra2")
        done = await core.service.wait_for_job(job.id, 30)
        assert done.state == "failed"
        assert done.error == (
            "The image server is busy right now; your quota was refunded. Please try again in about 3 min."
        )


async def test_reroll_and_variation_resolve_the_parent_from_the_message(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, delivery):
        parent = await core.service.imagine(
            ALICE, GUILD, "a fox --n 2 --seed 10 --steps 5 --no rain", idempotency_key="p"
        )
        await core.service.wait_for_job(parent.id, 30)
        await core.service.attach_result_message(parent.id, "msg-1", "chan1")
        assert (await core.service.job_for_message("discord", "msg-1")).id == parent.id
        assert (
            await core.service.react(BOB, GUILD, "msg-1", "\N{THUMBS UP SIGN}", idempotency_key="x") is None
        )
        assert await core.service.react(BOB, GUILD, "msg-unknown", "\U0001f501", idempotency_key="y") is None
        reroll = await core.service.react(BOB, GUILD, "msg-1", "\U0001f501", idempotency_key="rr")
        assert (reroll.kind, reroll.parent_id, reroll.user_id) == ("reroll", parent.id, "bob")
        assert (reroll.prompt, reroll.negative_prompt, reroll.params.steps, reroll.params.n) == (
            "a fox",
            "rain",
            5,
            2,
        )
        assert reroll.params.seed != 10
        variation = await core.service.react(BOB, GUILD, "msg-1", "two", idempotency_key="v2")  # Slack name
        same = await core.service.react(BOB, GUILD, "msg-1", ":two:", idempotency_key="v2")
        assert same.id == variation.id and not same.created
        no_selector = await core.service.react(BOB, GUILD, "msg-1", "1\u20e3", idempotency_key="v1")
        assert (no_selector.kind, no_selector.parent_image_index) == ("variation", 0)
        assert (variation.kind, variation.parent_image_index, variation.params.strength) == (
            "variation",
            1,
            0.6,
        )
        with pytest.raises(BadParameters) as err:
            await core.service.react(BOB, GUILD, "msg-1", "4\ufe0f\u20e3", idempotency_key="v4")
        assert err.value.field == "image" and "2 image" in err.value.message
        for j in (reroll, variation, no_selector):
            assert (await core.service.wait_for_job(j.id, 30)).state == "succeeded"
        # The variation was image-to-image from the parent's second image.
        calls = [c.params for c in core.backend.calls if c.params.task == "img2img"]
        async with core.db.read() as s:
            second = (
                await s.execute(select(ImageRow).where(ImageRow.job_id == parent.id, ImageRow.index == 1))
            ).scalar_one()
        sources = {hashlib.sha256(c.image).hexdigest() for c in calls}
        async with core.db.read() as s:
            first = (
                await s.execute(select(ImageRow).where(ImageRow.job_id == parent.id, ImageRow.index == 0))
            ).scalar_one()
        assert len(calls) == 2 and sources == {first.storage_key, second.storage_key}
        with pytest.raises(NotFound):
            await core.service.reroll(BOB, GUILD, job_id=9999, idempotency_key="nf")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def test_inpaint_with_mask_and_with_transparency(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, delivery):
        image = _png(Image.new("RGB", (128, 96), (10, 200, 30)))
        mask = Image.new("L", (128, 96), 0)
        mask.paste(255, (0, 0, 64, 48))
        job = await core.service.inpaint(
            ALICE, GUILD, "a hat --steps 4", image, _png(mask), idempotency_key="i1"
        )
        assert (job.kind, job.params.width, job.params.height, job.params.strength) == (
            "inpaint",
            72,
            56,
            1.0,
        )
        assert (await core.service.wait_for_job(job.id, 30)).state == "succeeded"
        sent = core.backend.calls[-1].params
        assert sent.task == "inpaint" and Image.open(io.BytesIO(sent.mask)).size == (72, 56)

        rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 255))
        rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))
        job2 = await core.service.inpaint(ALICE, GUILD, "sky", _png(rgba), None, idempotency_key="i2")
        assert (await core.service.wait_for_job(job2.id, 30)).state == "succeeded"
        m = Image.open(io.BytesIO(core.backend.calls[-1].params.mask)).convert("L")
        assert m.getpixel((5, 5)) == 255 and m.getpixel((60, 5)) == 0  # transparent = repaint

        bad = [
            (dict(image=image, mask=_png(Image.new("L", (10, 10), 255))), "mask", "10x10"),
            (dict(image=image, mask=None), "mask", "transparen"),
            (dict(image=b"not an image", mask=None), "image", "readable"),
            (dict(image=image, mask=_png(Image.new("L", (128, 96), 0))), "mask", "empty"),
        ]
        for i, (kw, field, needle) in enumerate(bad):
            with pytest.raises(BadParameters) as err:
                await core.service.inpaint(
                    ALICE, GUILD, "x", kw["image"], kw["mask"], idempotency_key=f"bad{i}"
                )
            assert err.value.field == field and needle in err.value.message
        with pytest.raises(BadParameters) as err:
            await core.service.inpaint(
                ALICE, GUILD, "x --ar 2:1", image, _png(mask), idempotency_key="bad-ar"
            )
        assert err.value.field == "ar"
        # Re-rolling an inpaint result inpaints again with the same image and mask.
        await core.service.attach_result_message(job.id, "m-inp")
        rr = await core.service.react(ALICE, GUILD, "m-inp", "repeat", idempotency_key="rr")
        assert (await core.service.wait_for_job(rr.id, 30)).state == "succeeded"
        assert core.backend.calls[-1].params.task == "inpaint"


async def test_remember_delivery_merges_into_the_jobs_delivery(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        job = await core.service.imagine(
            ALICE, GUILD, "x", idempotency_key="rd1", delivery={"channel": "C1", "thread_ts": "1.5"}
        )
        # concurrent writers of one job's mapping (e.g. two status updates) don't lose each other
        await asyncio.gather(
            core.service.remember_delivery(job.id, {"status_ts": "2.0"}),
            core.service.remember_delivery(job.id, {"status_channel": "C1"}),
        )
        await core.service.remember_delivery(job.id, {"status_ts": "3.0"})  # a later value wins
        view = await core.service.get_job(job.id)
        assert view.delivery == {
            "channel": "C1",
            "thread_ts": "1.5",
            "status_ts": "3.0",
            "status_channel": "C1",
        }
        with pytest.raises(NotFound):
            await core.service.remember_delivery(10_000, {"status_ts": "1.0"})


async def test_cancel_refunds_a_queued_job(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        job = await core.service.imagine(ALICE, GUILD, "x --n 3", idempotency_key="c1")
        from bot.core.api import NotAdmin

        with pytest.raises(NotAdmin):
            await core.service.cancel(BOB, job.id)
        cancelled = await core.service.cancel(ALICE, job.id)
        assert cancelled.state == "cancelled"
        assert (await core.service.quota(ALICE, GUILD)).used_today == 0
        assert (await core.service.cancel(ALICE, job.id)).state == "cancelled"  # idempotent, no double refund
        assert (await core.service.quota(ALICE, GUILD)).used_today == 0


async def test_same_event_in_two_processes_is_one_job(db_url, tmp_path):
    """Two bot processes receiving the same platform event (a retry, a replica) create one job."""
    async with (
        running_core(db_url, tmp_path, start=False, owner="a") as (core1, _),
        running_core(db_url, tmp_path, start=False, owner="b") as (core2, _),
    ):
        jobs = await asyncio.gather(
            *[
                (core1 if i % 2 else core2).service.imagine(ALICE, GUILD, "x --n 2", idempotency_key="evt")
                for i in range(10)
            ]
        )
        assert len({j.id for j in jobs}) == 1 and sum(j.created for j in jobs) == 1
        assert (await core1.service.quota(ALICE, GUILD)).used_today == 2
