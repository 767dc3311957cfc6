"""Fixtures: loopback fakes of the inference server (fakes.py) and of Hugging Face (fake_hf.py)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from tests.backends.fake_hf import FakeHuggingFace, fake_hugging_face
from tests.backends.fakes import FakeInferenceServer, RecordingSleep, start


async def _serve(fake):
    server = await start(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return server


@pytest.fixture
async def inference_server():
    fake = FakeInferenceServer()
    server = await _serve(fake)
    yield fake
    await server.close()


@pytest.fixture
async def second_inference_server():
    fake = FakeInferenceServer()
    server = await _serve(fake)
    yield fake
    await server.close()


@pytest.fixture
def refused_url() -> str:
    """A loopback URL where nothing listens (the port was bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def huggingface() -> AsyncIterator[FakeHuggingFace]:
    """Hugging Face's Hub and router on loopback, huggingface_hub pointed at them (fake_hf.py)."""
    async with fake_hugging_face() as fake:
        yield fake


@pytest.fixture
def sleeps() -> RecordingSleep:
    return RecordingSleep()
