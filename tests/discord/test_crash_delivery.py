"""A bot killed between posting a result and recording it must not post the result again.

The crash is simulated where it hurts: the platform has received the post, and the core's
`attach_result_message` (which records it) never returns; then the whole bot (adapter, core,
dispatcher) stops and a new one starts on the same database and the same fake Discord. From the
database's side this is what `kill -9` leaves behind: the job `succeeded`, its result undelivered,
one delivery attempt counted. (A real kill also leaves the lease, which a restart on the same host
expires at once: tests/core/test_dispatcher.py covers that with a real SIGKILL.)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from bot.core.models import Job
from bot.discord_adapter.delivery import job_nonce
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, result_job, wait_result


def die_after_posting(app: App) -> asyncio.Event:
    """From now on the bot "dies" right after a result reached Discord: recording it never ends."""
    posted = asyncio.Event()

    async def never_returns(*_args: Any, **_kwargs: Any) -> None:
        posted.set()
        await asyncio.Event().wait()

    app.service.attach_result_message = never_returns
    return posted


async def job_row(config: dict, job_id: int) -> Job:
    engine = create_async_engine(config["database"]["url"])
    try:
        async with engine.connect() as conn:
            return (await conn.execute(select(Job).where(Job.id == job_id))).one()
    finally:
        await engine.dispose()


def result_posts(fake: FakeDiscord) -> list[dict]:
    """Every message that shows a result image, channel messages and interaction responses alike."""
    return [m for m in fake.messages.values() if m["attachments"]]


async def test_interaction_result_is_found_in_the_original_response(fake_discord: FakeDiscord, tmp_path):
    alice = fake_discord.user("alice")
    config = app_config(tmp_path, fake_discord)
    async with App(fake_discord, config) as first:
        posted = die_after_posting(first)
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a kite", "count": 2})
        await asyncio.wait_for(posted.wait(), 60)
        shown = await wait_result(fake_discord, rec)
    row = await job_row(config, 1)
    assert (row.state, row.delivered_at, row.delivery_attempts) == ("succeeded", None, 1)

    async with App(fake_discord, config) as second:
        job = await result_job(second, shown)
        await fake_discord.wait_for(
            lambda: fake_discord.button_ids(fake_discord.messages[int(shown["id"])]), what="buttons"
        )
    assert job.id == 1 and (await job_row(config, 1)).delivery_attempts == 2
    uploads = [e for e in rec.edits if e["_files"]]
    assert len(uploads) == 1, "the result was uploaded again"
    assert [m["id"] for m in result_posts(fake_discord)] == [shown["id"]]


async def test_channel_result_is_found_in_the_history(fake_discord: FakeDiscord, tmp_path):
    """A result sent with the bot token (the interaction's token was about to expire) is a new
    channel message: after the restart the bot finds it in the channel's history."""
    bob = fake_discord.user("bob")
    config = app_config(tmp_path, fake_discord)
    async with App(fake_discord, config) as first:
        posted = die_after_posting(first)
        await fake_discord.slash("imagine", bob, {"prompt": "an old clock"}, created_at=time.time() - 870)
        await asyncio.wait_for(posted.wait(), 60)
    [shown] = result_posts(fake_discord)

    async with App(fake_discord, config) as second:
        job = await result_job(second, shown)
        await fake_discord.wait_for(
            lambda: fake_discord.button_ids(fake_discord.messages[int(shown["id"])]), what="buttons"
        )
    assert job.state == "succeeded"
    assert [m["id"] for m in result_posts(fake_discord)] == [shown["id"]]
    assert ("GET", f"/channels/{fake_discord.channel_id}/messages") in fake_discord.requests
    assert fake_discord.nonce_hits == []


async def test_without_history_access_the_nonce_stops_a_second_post(fake_discord: FakeDiscord, tmp_path):
    """No Read Message History: Discord refuses the history (403), and the send with the job's
    nonce (enforce_nonce) gets the message Discord already has instead of a second one."""
    bob = fake_discord.user("bob")
    config = app_config(tmp_path, fake_discord)
    async with App(fake_discord, config) as first:
        posted = die_after_posting(first)
        await fake_discord.slash("imagine", bob, {"prompt": "a sealed room"}, created_at=time.time() - 870)
        await asyncio.wait_for(posted.wait(), 60)
    [shown] = result_posts(fake_discord)

    fake_discord.fail_next("GET", r"^/channels/\d+/messages$", status=403, code=50001, times=10)
    async with App(fake_discord, config) as second:
        job = await result_job(second, shown)
    assert fake_discord.failures_hit() >= 1
    assert fake_discord.nonce_hits == [job_nonce(job.id)]
    assert [m["id"] for m in result_posts(fake_discord)] == [shown["id"]]


async def test_reaction_result_is_found_in_its_status_message(fake_discord: FakeDiscord, tmp_path):
    """A variation asked by reaction shows its status, then its result, in one channel message; its
    id is kept with the job, so the restarted bot looks there first."""
    alice, carol = fake_discord.user("alice"), fake_discord.user("carol")
    config = app_config(tmp_path, fake_discord)
    async with App(fake_discord, config) as first:
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a lighthouse", "count": 2})
        parent = await wait_result(fake_discord, rec)
        await result_job(first, parent)
        posted = die_after_posting(first)
        await fake_discord.react(int(parent["id"]), "2️⃣", carol)
        await asyncio.wait_for(posted.wait(), 60)
    [shown] = [m for m in result_posts(fake_discord) if m["id"] != parent["id"]]

    async with App(fake_discord, config) as second:
        job = await result_job(second, shown)
        await fake_discord.wait_for(
            lambda: fake_discord.button_ids(fake_discord.messages[int(shown["id"])]), what="buttons"
        )
    assert (job.kind, job.user_id) == ("variation", str(carol.id))
    assert job.delivery["status_message_id"] == shown["id"]
    assert sorted(m["id"] for m in result_posts(fake_discord)) == sorted([parent["id"], shown["id"]])
