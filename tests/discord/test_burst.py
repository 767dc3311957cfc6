"""A burst of 200 /imagine interactions: every one deferred inside Discord's 3-second deadline while
the gateway heartbeat keeps being answered. The fake enforces the deadline itself (a late callback
gets 404 / 10062 as on Discord); the dispatch-to-callback delays are that protocol deadline."""

from __future__ import annotations

import logging
import time

import pytest

from bot.backends.fake import FakeBackend
from tests.discord.fake_discord import INTERACTION_DEADLINE_S, FakeDiscord
from tests.discord.harness import App, app_config

BURST = 200
USERS = 20  # 10 jobs each: within the default daily limit (25), so every job is accepted


async def test_burst_of_200_all_deferred_in_time(
    fake_discord: FakeDiscord, tmp_path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="discord.gateway")
    users = [fake_discord.user(f"user{i}") for i in range(USERS)]
    # Real progress throttling (one edit per 2 s per job), as in production.
    config = app_config(tmp_path, fake_discord, discord={"progress_edit_interval_s": 2.0})
    backend = FakeBackend()
    async with App(fake_discord, config, backend=backend) as app:
        # The first jobs hold the backend: the queue stays put while the 200 arrive, so the test
        # measures the adapter under a burst rather than the dispatcher's throughput.
        backend.hold()
        records = [
            fake_discord.build_slash("imagine", users[i % USERS], {"prompt": f"burst {i}", "steps": 2})
            for i in range(BURST)
        ]
        started = time.monotonic()
        await fake_discord.send_interactions(records)
        await fake_discord.wait_for(
            lambda: all(r.callbacks for r in records), within=60, what="200 callbacks"
        )
        # Every interaction then got its answer from the core (queue position, result or refusal):
        # none was lost. Waiting for all 200 images would time the core's dispatcher, not the adapter.
        await fake_discord.wait_for(
            lambda: all(r.texts() or r.followups for r in records),
            within=90,
            what="an answer to each of the 200",
        )
        busy_for = time.monotonic() - started
        backend.release()
        await fake_discord.wait_for(
            lambda: any(r.original and r.original["attachments"] for r in records), what="a first result"
        )
        app.check_alive()
        # Heartbeats sent by the bot while it worked through the burst, each answered by the fake.
        beats = [t for t in fake_discord.heartbeats if started <= t <= started + busy_for]
        refused = [r for r in records if r.followups and r.followups[-1]["flags"] & 64]
    assert all(r.callbacks[0]["status"] == 200 and r.callbacks[0]["body"]["type"] == 5 for r in records)
    delays = sorted(r.callback_at - r.dispatched_at for r in records)
    assert delays[-1] < INTERACTION_DEADLINE_S, f"slowest defer {delays[-1]:.2f}s"
    assert refused == []  # each of the 200 was accepted (20 users x 10 is within the quota)
    # discord.py beats from a thread of its own, each beat sent through the event loop: a loop
    # blocked by the burst holds them back. No count per second is asserted: discord.py waits the
    # interval (500 ms in the fake) after each beat is through, so on a loaded machine every period
    # is longer by the loop's latency and the count drifts below busy/interval (10 beats in 6.0 s
    # under two CPU hogs on 2 cores, where "at least 11" failed). The library's own verdict is
    # asserted instead: it warns when a beat is blocked or the socket falls behind, and a beat left
    # unanswered would have made it reconnect.
    interval_s = fake_discord.heartbeat_interval_ms / 1000
    assert beats or busy_for < 2 * interval_s, f"no heartbeat in {busy_for:.1f}s busy"
    gateway_warnings = [r.getMessage() for r in caplog.records if r.name == "discord.gateway"]
    assert not [m for m in gateway_warnings if "blocked" in m or "keep up" in m], gateway_warnings
    assert len(fake_discord.identifies) == 1  # no reconnect: the session survived
    print(
        f"burst: {BURST} defers, median {delays[BURST // 2] * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms; "
        f"all answered after {busy_for:.1f}s with {len(beats)} heartbeats answered meanwhile"
    )
