"""Fixtures: loopback fakes of the inference server and Hugging Face HTTP contracts (see fakes.py)."""

from __future__ import annotations

import socket

import pytest

from tests.backends.fakes import FakeHuggingFace, FakeInferenceServer, RecordingSleep, start


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
async def huggingface():
    fake = FakeHuggingFace()
    server = await _serve(fake)
    yield fake
    await server.close()


@pytest.fixture
def sleeps() -> RecordingSleep:
    return RecordingSleep()
