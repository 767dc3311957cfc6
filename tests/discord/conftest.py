"""Fixtures for the Discord adapter tests: a fake Discord on loopback and a harness running a real bot.

discord.py has no setting for its API base or gateway URL, so the fixture points two library
internals at the fake (`Route.BASE`, `DiscordWebSocket.DEFAULT_GATEWAY`) and restores them after the
test; `test_fake_discord.py::test_library_internals_canary` fails first if a discord.py upgrade
renames them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import discord
import pytest

from tests.discord.fake_discord import FakeDiscord


@pytest.fixture
async def fake_discord(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", fake.gateway_url)
    try:
        yield fake
    finally:
        await fake.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A wedged bot or core must fail its own test, not eat the whole suite's 300 s default.
    for item in items:
        if "tests/discord/" in str(item.fspath) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(float(os.environ.get("DISCORD_TEST_TIMEOUT_S", "120"))))
