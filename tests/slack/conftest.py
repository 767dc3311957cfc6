"""Fixtures: a fake Slack on loopback, an HTTP session, and the real adapter on the real core."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.slack.fake_slack import FakeSlack
from tests.slack.harness import ADMIN_ID, Running, running_adapter


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        fake.add_user("UALICE01", name="alice")
        fake.add_user("UBOB0001", name="bob")
        fake.add_user(ADMIN_ID, name="configured-admin")
        fake.add_user("UWSADMIN", name="workspace-admin", is_admin=True)
        yield fake


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def slack(fake_slack: FakeSlack, tmp_path: Path, http: aiohttp.ClientSession) -> AsyncIterator[Running]:
    async with running_adapter(fake_slack, tmp_path, http) as r:
        yield r
