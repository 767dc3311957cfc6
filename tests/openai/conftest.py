"""The real server (tiny random pipeline) on loopback, and the official `openai` client pointed at it.

The server fixtures are the server tests' own (imported, not copied), so both suites exercise the
same app with the same config."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest

from tests.server.conftest import TOKEN, Server, server, server_factory, tiny_model  # noqa: F401 (fixtures)


def make_client(target: Server, *, api_key: str = TOKEN) -> openai.AsyncOpenAI:
    # No retries: the tests check the first answer (a retry on 429/503 would hide it).
    return openai.AsyncOpenAI(base_url=f"{target.url}/v1", api_key=api_key, max_retries=0, timeout=60.0)


@asynccontextmanager
async def client_for(target: Server, **kwargs: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    client = make_client(target, **kwargs)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[openai.AsyncOpenAI]:  # noqa: F811
    async with client_for(server) as c:
        yield c
