"""Delivery edge cases: 429s, tokens near their 15-minute expiry, uploads over the limit."""

from __future__ import annotations

import time

from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, image_size, result_job, wait_ephemeral, wait_result


async def test_429_on_followups_is_retried(fake_discord: FakeDiscord, tmp_path):
    user = fake_discord.user("patient")
    async with App(fake_discord, app_config(tmp_path, fake_discord)):
        # Every edit of the response (queue, progress, result) is rate limited once...
        fake_discord.fail_next("PATCH", r"^/webhooks/\d+/[^/]+/messages/@original$", retry_after=0.2, times=2)
        rec = await fake_discord.slash("imagine", user, {"prompt": "a patient snail", "steps": 2})
        result = await wait_result(fake_discord, rec)
        # ...and so is the followup carrying a private error.
        fake_discord.fail_next("POST", r"^/webhooks/\d+/[^/]+$", retry_after=0.2)
        bad = await fake_discord.slash("imagine", user, {"prompt": "x --steps 0"})
        text = await wait_ephemeral(fake_discord, bad)
    assert fake_discord.failures_hit() == 3
    assert result["_files"] and "a patient snail" in result["content"]
    assert "steps" in text
    patches = [p for (m, p) in fake_discord.requests if m == "PATCH" and p.endswith("@original")]
    assert len(patches) >= 3  # the rate-limited attempts were retried, not dropped


async def test_result_near_token_expiry_goes_to_the_channel(fake_discord: FakeDiscord, tmp_path):
    user = fake_discord.user("late")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        # An interaction created 14.5 minutes ago: still answerable (defer), but its token has less
        # than the configured margin left, so the result must not go through it.
        rec = await fake_discord.slash(
            "imagine", user, {"prompt": "an old clock"}, created_at=time.time() - 870
        )
        message = await fake_discord.wait_for(
            lambda: [m for m in fake_discord.channel_messages() if m["attachments"]], what="channel result"
        )
        job = await result_job(app, message[0])
        await fake_discord.wait_for(
            lambda: fake_discord.button_ids(fake_discord.messages[int(message[0]["id"])]), what="buttons"
        )
    assert rec.deferred
    assert not rec.edits and not rec.followups  # nothing sent through the expiring token
    assert "an old clock" in message[0]["content"] and f"<@{user.id}>" in message[0]["content"]
    assert job is not None and job.state == "succeeded"


async def test_expired_token_falls_back_to_the_channel(fake_discord: FakeDiscord, tmp_path):
    user = fake_discord.user("late")
    # Margin 0: the bot would use the token, which the platform refuses (401 Invalid Webhook Token).
    config = app_config(tmp_path, fake_discord, discord={"token_margin_s": 0})
    async with App(fake_discord, config):
        fake_discord.fail_next("PATCH", r"@original$", status=401, code=50027, times=100)
        rec = await fake_discord.slash("imagine", user, {"prompt": "a lost letter"})
        message = await fake_discord.wait_for(
            lambda: [m for m in fake_discord.channel_messages() if m["attachments"]], what="channel result"
        )
    assert rec.deferred and fake_discord.failures_hit() >= 1
    assert "a lost letter" in message[0]["content"]


async def test_upload_over_the_limit_is_reencoded(fake_discord: FakeDiscord, tmp_path):
    user = fake_discord.user("big")
    config = app_config(tmp_path, fake_discord, bot={"base_size": 256})
    async with App(fake_discord, config):
        # First learn how large the full-size PNG grid is, then allow a third of that.
        probe = await fake_discord.slash("imagine", user, {"prompt": "noise", "count": 4, "seed": 7})
        full = (await wait_result(fake_discord, probe))["_files"][0]
        limit = len(full) // 3
        rec = await fake_discord.slash(
            "imagine", user, {"prompt": "noise", "count": 4, "seed": 7}, size_limit=limit
        )
        result = await wait_result(fake_discord, rec)
    data = result["_files"][0]
    assert len(data) <= limit < len(full)
    assert result["attachments"][0]["filename"].endswith((".jpg", ".png"))
    w, h = image_size(data)
    assert w > 0 and w == h and w <= image_size(full)[0]


async def test_failed_job_is_reported_without_traceback(fake_discord: FakeDiscord, tmp_path):
    from bot.backends.base import BackendRejected
    from bot.backends.fake import FakeBackend
    from bot.core.api import Actor, Place

    user = fake_discord.user("unlucky")
    backend = FakeBackend()
    async with App(fake_discord, app_config(tmp_path, fake_discord), backend=backend) as app:
        backend.fail_next(1, BackendRejected("the model cannot draw this size", "width"))
        rec = await fake_discord.slash("imagine", user, {"prompt": "an impossible shape"})
        text = await fake_discord.wait_for(
            lambda: next((t for t in rec.texts() if t.startswith("❌")), None), what="the failure message"
        )
        quota = await app.service.quota(
            Actor("discord", str(user.id)), Place("discord", str(fake_discord.guild_id))
        )
    assert "an impossible shape" in text and "Traceback" not in text
    assert quota.used_today == 0  # refunded by the core before the adapter heard of it
