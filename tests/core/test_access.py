"""Who may start a job from another job: every core operation that takes a job id or a result message
checks the platform, and the owner / channel / admin rules, so that a job id guessed in one place never
hands out what someone else asked for in another."""

from __future__ import annotations

import pytest

from bot.core.api import Actor, NotAdmin, NotFound, Place
from tests.core.helpers import ADMIN, ALICE, BOB, GUILD, running_core

WEB_USER = Actor("web", "mallory", "Mallory")
WEB = Place("web")
OTHER_GUILD = Place("discord", "guild2", "chan9")
OTHER_CHANNEL = Place("discord", "guild1", "chan2")


async def finished_job(
    core, actor: Actor, place: Place, key: str, message_id: str | None = None, channel=None
):
    job = await core.service.imagine(actor, place, "a secret prompt --n 2", idempotency_key=key)
    assert (await core.service.wait_for_job(job.id, 30)).state == "succeeded"
    if message_id is not None:
        await core.service.attach_result_message(job.id, message_id, channel)
    return job


async def test_a_web_user_cannot_reach_a_discord_job(db_url, tmp_path):
    async with running_core(db_url, tmp_path, deliver=("discord", "web")) as (core, _):
        job = await finished_job(core, ALICE, GUILD, "d1", "msg-1", "chan1")
        for attempt in (
            core.service.reroll(WEB_USER, WEB, job_id=job.id, idempotency_key="w1"),
            core.service.variation(WEB_USER, WEB, 0, job_id=job.id, idempotency_key="w2"),
            core.service.reroll(WEB_USER, WEB, message_id="msg-1", idempotency_key="w3"),
            core.service.variation(WEB_USER, WEB, 1, message_id="msg-1", idempotency_key="w4"),
            core.service.cancel(WEB_USER, job.id),
            core.service.cancel(Actor("web", "root", is_admin=True), job.id, WEB),
        ):
            with pytest.raises(NotFound) as err:
                await attempt
            assert "secret" not in err.value.message
        assert await core.service.react(WEB_USER, WEB, "msg-1", "🔁", idempotency_key="w5") is None
        assert await core.service.history(WEB_USER) == []


async def test_by_job_id_only_the_owner_or_an_admin_of_its_guild(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, _):
        job = await finished_job(core, ALICE, GUILD, "a1")
        with pytest.raises(NotFound):
            await core.service.reroll(BOB, GUILD, job_id=job.id, idempotency_key="b1")
        with pytest.raises(NotFound):
            await core.service.variation(BOB, GUILD, 0, job_id=job.id, idempotency_key="b2")
        with pytest.raises(NotFound):  # an admin of another guild is not an admin here
            await core.service.reroll(ADMIN, OTHER_GUILD, job_id=job.id, idempotency_key="x1")
        mine = await core.service.reroll(ALICE, GUILD, job_id=job.id, idempotency_key="a2")
        admins = await core.service.variation(ADMIN, GUILD, 1, job_id=job.id, idempotency_key="x2")
        assert (mine.parent_id, admins.parent_id, admins.parent_image_index) == (job.id, job.id, 1)
        assert admins.user_id == "root"


async def test_by_result_message_anyone_in_the_channel_that_shows_it(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, _):
        shown = await finished_job(core, ALICE, GUILD, "a1", "msg-1", "chan1")
        rr = await core.service.react(BOB, GUILD, "msg-1", "🔁", idempotency_key="b1")
        assert rr is not None and rr.parent_id == shown.id and rr.user_id == "bob"
        # The same message id from another channel or guild resolves to nothing.
        assert await core.service.react(BOB, OTHER_CHANNEL, "msg-1", "🔁", idempotency_key="b2") is None
        with pytest.raises(NotFound):
            await core.service.reroll(BOB, OTHER_GUILD, message_id="msg-1", idempotency_key="b3")


async def test_a_result_shown_in_no_channel_is_its_owners(db_url, tmp_path):
    """The playground shows a result only to its owner: its "message" is no capability for others."""
    async with running_core(db_url, tmp_path, deliver=("web",)) as (core, _):
        alice = Actor("web", "alice", "alice")
        job = await finished_job(core, alice, WEB, "wa", "web-job-1")
        assert await core.service.react(WEB_USER, WEB, "web-job-1", "🔁", idempotency_key="m1") is None
        with pytest.raises(NotFound):
            await core.service.reroll(WEB_USER, WEB, message_id="web-job-1", idempotency_key="m2")
        again = await core.service.react(alice, WEB, "web-job-1", "🔁", idempotency_key="a2")
        assert again is not None and again.parent_id == job.id


async def test_cancel_checks_platform_owner_and_the_admins_guild(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        job = await core.service.imagine(ALICE, GUILD, "x --n 3", idempotency_key="c1")
        with pytest.raises(NotAdmin):
            await core.service.cancel(BOB, job.id)
        with pytest.raises(NotFound):
            await core.service.cancel(ADMIN, job.id, OTHER_GUILD)
        with pytest.raises(NotFound):
            await core.service.cancel(ADMIN, job.id)  # no place: not this guild's admin
        assert (await core.service.cancel(ADMIN, job.id, GUILD)).state == "cancelled"
        assert (await core.service.quota(ALICE, GUILD)).used_today == 0


async def test_someone_elses_idempotency_key_is_not_their_job(db_url, tmp_path):
    """A retried event comes from the same user; the same key from another user must not return
    (and so show) the first user's job."""
    from bot.core.api import BadParameters

    async with running_core(db_url, tmp_path, start=False) as (core, _):
        job = await core.service.imagine(ALICE, GUILD, "a secret prompt", idempotency_key="evt-1")
        for attempt in (
            core.service.imagine(BOB, GUILD, "anything", idempotency_key="evt-1"),
            core.service.reroll(BOB, GUILD, job_id=job.id, idempotency_key="evt-1"),
        ):
            with pytest.raises(BadParameters) as err:
                await attempt
            assert err.value.field == "idempotency_key" and "secret" not in err.value.message
        again = await core.service.imagine(ALICE, GUILD, "a secret prompt", idempotency_key="evt-1")
        assert again.id == job.id and not again.created
