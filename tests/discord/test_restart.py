"""A restart: the bot and core stop, start again on the same database, and old results still work."""

from __future__ import annotations

import os

import pytest

from bot.core.api import Actor
from tests.core.conftest import create_pg_database, drop_pg_database, pg_unavailable_reason
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, result_job, wait_result


async def test_reaction_on_a_result_from_before_a_restart(fake_discord: FakeDiscord, tmp_path):
    alice, bob = fake_discord.user("alice"), fake_discord.user("bob")
    config = app_config(tmp_path, fake_discord)
    async with App(fake_discord, config) as first:
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a ship in a bottle", "count": 2})
        old = await wait_result(fake_discord, rec)
        old_job = await result_job(first, old)
    assert "discord" not in first.service.deliveries  # run() cleaned up when cancelled
    await fake_discord.wait_for(lambda: not fake_discord.connected(), what="the gateway to close")

    # A new process: new bot session, new core objects, same SQLite file and image storage.
    async with App(fake_discord, config) as second:
        assert len(fake_discord.identifies) == 2
        await fake_discord.react(int(old["id"]), "2️⃣", bob)
        new = await fake_discord.wait_for(
            lambda: [m for m in fake_discord.channel_messages() if m["attachments"]],
            what="variation after restart",
        )
        new_job = await result_job(second, new[0])
        bob_jobs = await second.service.history(Actor("discord", str(bob.id)), 5)
    assert new_job.kind == "variation" and new_job.parent_id == old_job.id and new_job.parent_image_index == 1
    assert [j.id for j in bob_jobs] == [new_job.id]
    assert int(new[0]["_reference"]["message_id"]) == int(old["id"])
    assert "a ship in a bottle" in new[0]["content"]


async def test_job_accepted_before_a_restart_is_delivered_after_it(fake_discord: FakeDiscord, tmp_path):
    from bot.backends.fake import FakeBackend

    carol = fake_discord.user("carol")
    config = app_config(tmp_path, fake_discord)
    held = FakeBackend()
    held.hold()  # the job starts but never finishes in the first process
    async with App(fake_discord, config, backend=held):
        rec = await fake_discord.slash("imagine", carol, {"prompt": "a phoenix"})
        await fake_discord.wait_for(lambda: held.in_flight == 1, what="the job to start")
    assert not (rec.original and rec.original["attachments"])

    # The next process takes the job back from the database and answers the same interaction
    # (its token is still valid), editing the message the user is looking at.
    async with App(fake_discord, config) as second:
        result = await wait_result(fake_discord, rec)
        job = await result_job(second, result)
    assert job.state == "succeeded" and job.prompt == "a phoenix"
    assert "a phoenix" in result["content"] and f"<@{carol.id}>" in result["content"]


async def test_gateway_drop_is_resumed_and_commands_keep_working(fake_discord: FakeDiscord, tmp_path):
    dan = fake_discord.user("dan")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        await fake_discord.drop_gateway()
        await fake_discord.wait_for(
            lambda: fake_discord.resumes and fake_discord.connected(), what="a resume"
        )
        rec = await fake_discord.slash("imagine", dan, {"prompt": "after the storm"})
        result = await wait_result(fake_discord, rec)
        app.check_alive()
    assert len(fake_discord.identifies) == 1  # resumed the session, not a new login
    assert fake_discord.resumes[0]["session_id"] == "session-1"
    assert "after the storm" in result["content"]


@pytest.mark.postgres
async def test_restart_and_reaction_on_postgresql(fake_discord: FakeDiscord, tmp_path):
    """The restart flow on the deployment database."""
    reason = pg_unavailable_reason()
    if reason is not None:
        if os.environ.get("IMAGINE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"IMAGINE_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    url = create_pg_database()
    try:
        config = app_config(tmp_path, fake_discord, database={"url": url, "auto_migrate": True})
        alice, bob = fake_discord.user("alice"), fake_discord.user("bob")
        async with App(fake_discord, config) as first:
            rec = await fake_discord.slash("imagine", alice, {"prompt": "a lantern", "count": 4})
            old = await wait_result(fake_discord, rec)
            old_job = await result_job(first, old)
        async with App(fake_discord, config) as second:
            await fake_discord.react(int(old["id"]), "🔁", bob)
            new = await fake_discord.wait_for(
                lambda: [m for m in fake_discord.channel_messages() if m["attachments"]], what="re-roll"
            )
            new_job = await result_job(second, new[0])
        assert new_job.kind == "reroll" and new_job.parent_id == old_job.id and new_job.user_id == str(bob.id)
    finally:
        drop_pg_database(url)
