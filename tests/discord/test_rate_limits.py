"""Against a fake that enforces Discord's per-channel limits (5 channel messages per 5 s, one
reaction per 0.25 s): results in one channel cost no rate-limited call and no reaction, so their
throughput is not capped by the channel (`tests/bench/discord_bench.py` measures it)."""

from __future__ import annotations

import aiohttp
import pytest

from bot.backends.fake import FakeBackend
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config

RESULTS = 30


@pytest.fixture
def fake_discord(fake_discord: FakeDiscord) -> FakeDiscord:
    fake_discord.rate_limits = True
    return fake_discord


async def test_a_burst_of_results_in_one_channel_meets_no_rate_limit(fake_discord: FakeDiscord, tmp_path):
    users = [fake_discord.user(f"user{i}") for i in range(5)]
    backend = FakeBackend()
    config = app_config(tmp_path, fake_discord, discord={"progress_edit_interval_s": 2.0})
    async with App(fake_discord, config, backend=backend):
        backend.hold()
        records = [
            fake_discord.build_slash("imagine", users[i % 5], {"prompt": f"burst {i}", "steps": 2})
            for i in range(RESULTS)
        ]
        await fake_discord.send_interactions(records)
        await fake_discord.wait_for(lambda: all(r.texts() for r in records), within=60, what="statuses")
        backend.release()
        await fake_discord.wait_for(
            lambda: all(r.original and r.original["attachments"] for r in records), within=60, what="results"
        )
    assert fake_discord.rate_limited == []
    assert fake_discord.reactions == []  # no hint reactions: the buttons say what is possible
    assert all(fake_discord.button_ids(r.original) for r in records)


async def test_the_fake_enforces_the_channel_limits(fake_discord: FakeDiscord):
    """The limits are real: a sixth channel message within 5 s, or a second reaction within 0.25 s,
    gets 429 with retry_after (discord.py, reading the rate-limit headers, waits before that)."""
    headers = {"Authorization": f"Bot {fake_discord.token}"}
    base = f"{fake_discord.api_base}/channels/{fake_discord.channel_id}/messages"
    async with aiohttp.ClientSession(headers=headers) as http:
        statuses = []
        for i in range(6):
            async with http.post(base, json={"content": f"message {i}"}) as resp:
                statuses.append(resp.status)
                body = await resp.json()
        message_id = next(iter(fake_discord.messages))
        reacts = []
        for _ in range(2):
            async with http.put(f"{base}/{message_id}/reactions/%F0%9F%94%81/@me") as resp:
                reacts.append((resp.status, resp.headers.get("Via")))
    assert statuses == [200] * 5 + [429] and 0 < body["retry_after"] <= 5
    assert reacts == [(204, None), (429, "1.1 google")]
    assert len(fake_discord.rate_limited) == 2
