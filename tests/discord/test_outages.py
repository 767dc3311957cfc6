"""Regressions of the delivery defects found in issue 21, through the real discord.py and the fake:

- Discord answering 5xx to the result's post (an outage): retried with backoff until it goes
  through, through the interaction while its token lasts, then as a channel message, and across a
  restart (the job stays undelivered until a post succeeds);
- a deleted "thinking..." message: no ERROR and no traceback, the result goes to the channel;
- a `<@someone>` typed into a prompt pings nobody: results ping their requester only;
- the first status message already shows the queue position.
"""

from __future__ import annotations

import asyncio
import logging
import time

import discord
import discord.http
import discord.webhook.async_
import pytest

from bot.backends.fake import FakeBackend
from bot.core.api import Actor
from bot.discord_adapter import delivery as discord_delivery
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, result_job, wait_result

ORIGINAL = r"/messages/@original$"


class _QuickSleeps:
    """asyncio as discord.py's HTTP modules see it, with its retry sleeps (1 + 2 * attempt s, five
    times: ~25 s per request in an outage) cut short: the outage is simulated, the waiting need not be."""

    def __getattr__(self, name: str):
        return getattr(asyncio, name)

    @staticmethod
    async def sleep(delay: float, result=None):
        return await asyncio.sleep(min(delay, 0.01), result)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord_delivery, "RETRY_FIRST_S", 0.05)
    monkeypatch.setattr(discord_delivery, "RETRY_MAX_S", 0.2)
    monkeypatch.setattr(discord.webhook.async_, "asyncio", _QuickSleeps())
    monkeypatch.setattr(discord.http, "asyncio", _QuickSleeps())


def uploads(rec) -> list[dict]:
    return [e for e in rec.edits if e["_files"]]


async def test_result_is_retried_through_a_5xx_outage(fake_discord: FakeDiscord, tmp_path):
    alice = fake_discord.user("alice")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        fake_discord.fail_next("PATCH", ORIGINAL, status=503, times=12)
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a storm"})
        result = await wait_result(fake_discord, rec)
        job = await result_job(app, result)
    assert fake_discord.failures_hit() == 12  # more than discord.py's own 5 tries of one request
    assert len(uploads(rec)) == 1 and fake_discord.channel_messages() == []
    assert job.state == "succeeded" and job.result_message_id == result["id"]


async def test_an_outage_past_the_token_ends_in_a_channel_message(fake_discord: FakeDiscord, tmp_path):
    alice = fake_discord.user("alice")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        fake_discord.fail_next("PATCH", ORIGINAL, status=502, times=100_000)
        # 3 s of token left before the 120 s margin: the outage outlasts it.
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a flood"}, created_at=time.time() - 777)
        [message] = await fake_discord.wait_for(
            lambda: [m for m in fake_discord.channel_messages() if m["attachments"]],
            within=60,
            what="channel",
        )
        job = await result_job(app, message)
    assert fake_discord.failures_hit() >= 1 and uploads(rec) == []
    assert job.result_message_id == message["id"] and "a flood" in message["content"]


async def test_an_outage_across_a_restart_delivers_once(fake_discord: FakeDiscord, tmp_path):
    alice = fake_discord.user("alice")
    config = app_config(tmp_path, fake_discord)
    async with App(fake_discord, config) as first:
        fake_discord.fail_next("PATCH", ORIGINAL, status=503, times=100_000)
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a blackout"})
        for _ in range(200):
            history = await first.service.history(Actor("discord", str(alice.id)))
            if history and history[0].state == "succeeded":
                break
            await asyncio.sleep(0.05)
        hits = fake_discord.failures_hit()
        await fake_discord.wait_for(lambda: fake_discord.failures_hit() >= hits + 6, what="failed posts")
        still = await first.service.get_job(1)
    assert still.state == "succeeded" and uploads(rec) == []
    fake_discord._failures.clear()  # Discord is back
    async with App(fake_discord, config) as second:
        result = await wait_result(fake_discord, rec)
        job = await result_job(second, result)
    assert len(uploads(rec)) == 1 and job.result_message_id == result["id"]


async def test_a_deleted_thinking_message_is_a_quiet_fallback(fake_discord: FakeDiscord, tmp_path, caplog):
    alice = fake_discord.user("alice")
    backend = FakeBackend()
    async with App(fake_discord, app_config(tmp_path, fake_discord), backend=backend) as app:
        backend.hold()
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a ghost", "steps": 5})
        await fake_discord.wait_for(lambda: backend.in_flight == 1, what="the job to start")
        # The user deletes the bot's "thinking..." message.
        rec.deleted_original = True
        fake_discord.messages.pop(int(rec.original["id"]))
        with caplog.at_level(logging.INFO):
            backend.release()
            [message] = await fake_discord.wait_for(
                lambda: [m for m in fake_discord.channel_messages() if m["attachments"]],
                what="channel result",
            )
            job = await result_job(app, message)
        # Judged before the app shuts down: what the fallback logs, not what a shutdown cancels.
        loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert job.result_message_id == message["id"]
    assert any("status message is gone" in r.getMessage() for r in caplog.records)
    assert loud == [], [r.getMessage() for r in loud]


async def test_results_ping_only_the_requester(fake_discord: FakeDiscord, tmp_path):
    alice, bob, carol = fake_discord.user("alice"), fake_discord.user("bob"), fake_discord.user("carol")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        rec = await fake_discord.slash("imagine", alice, {"prompt": f"a portrait of <@{carol.id}>"})
        result = await wait_result(fake_discord, rec)
        await result_job(app, result)
        await fake_discord.react(int(result["id"]), "🔁", bob)  # bob's job: channel messages
        [reroll] = await fake_discord.wait_for(
            lambda: [m for m in fake_discord.channel_messages() if m["attachments"]], what="re-roll"
        )
    assert f"<@{carol.id}>" in reroll["content"]
    sent = [m["_allowed_mentions"] for m in fake_discord.channel_messages()]
    assert sent and all(list(map(str, a["users"])) == [str(bob.id)] and a["parse"] == [] for a in sent)
    edits = [e["allowed_mentions"] for e in rec.edits if "allowed_mentions" in e]
    assert edits and all(list(map(str, a["users"])) == [str(alice.id)] and a["parse"] == [] for a in edits)


async def test_the_first_status_shows_the_queue_position(fake_discord: FakeDiscord, tmp_path):
    alice, bob = fake_discord.user("alice"), fake_discord.user("bob")
    backend = FakeBackend()
    # Real throttling of status edits: the first one must carry the position by itself.
    config = app_config(
        tmp_path, fake_discord, bot={"dispatch_concurrency": 1}, discord={"progress_edit_interval_s": 5.0}
    )
    async with App(fake_discord, config, backend=backend):
        backend.hold()
        await fake_discord.slash("imagine", alice, {"prompt": "first"})
        await fake_discord.wait_for(lambda: backend.in_flight == 1, what="the first job to start")
        rec = await fake_discord.slash("imagine", bob, {"prompt": "second"})
        await fake_discord.wait_for(lambda: rec.texts(), what="a status")
        first_text = rec.texts()[0]
        backend.release()
        await wait_result(fake_discord, rec)
        await asyncio.sleep(0)
    assert "starts next" in first_text, first_text


async def test_the_first_status_never_replaces_a_fresher_position(
    fake_discord: FakeDiscord, tmp_path, monkeypatch
):
    """The adapter reads a new job's position for its first status; when the core's own report of
    a later position is shown before that read gets shown, the older read must not replace it (the
    core reports a position again only when it changes, so it would stay until the queue moves)."""
    alice, bob, carol = (fake_discord.user(name) for name in ("alice", "bob", "carol"))
    backend = FakeBackend()
    config = app_config(tmp_path, fake_discord, bot={"dispatch_concurrency": 1})
    async with App(fake_discord, config, backend=backend) as app:
        backend.hold()
        await fake_discord.slash("imagine", alice, {"prompt": "first"})
        await fake_discord.wait_for(lambda: backend.in_flight == 1, what="the first job to start")
        ahead = await fake_discord.slash("imagine", bob, {"prompt": "second"})
        await fake_discord.wait_for(lambda: ahead.texts(), what="the second job's status")

        service, delivery = app.service, app.service.deliveries["discord"]  # the core's calls go here
        bot = getattr(delivery, "inner", delivery).bot
        reported_next = asyncio.Event()
        on_queued = delivery.on_queued

        async def on_queued_watched(job, position) -> None:
            await on_queued(job, position)
            if job.id == 3 and position == 1:
                reported_next.set()

        queue_position = service.queue_position

        async def read_then_the_queue_moves(job_id: int):
            position = await queue_position(job_id)  # 2: behind bob's job
            await service.cancel(Actor("discord", str(bob.id)), 2)
            async with asyncio.timeout(30):
                await reported_next.wait()  # the core showed "starts next"
            return position

        shown = asyncio.Event()
        show_queued = bot.show_queued

        async def show_queued_watched(job) -> None:
            await show_queued(job)
            shown.set()

        monkeypatch.setattr(delivery, "on_queued", on_queued_watched)
        monkeypatch.setattr(service, "queue_position", read_then_the_queue_moves)
        monkeypatch.setattr(bot, "show_queued", show_queued_watched)
        rec = await fake_discord.slash("imagine", carol, {"prompt": "third"})
        async with asyncio.timeout(30):
            await shown.wait()
        waiting = rec.texts()
        backend.release()
        await wait_result(fake_discord, rec)
    assert "starts next" in waiting[-1], waiting
