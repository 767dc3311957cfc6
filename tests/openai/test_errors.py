"""Errors reach the official client as the exception OpenAI's own API would raise, naming the field."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from inference_server import keys
from tests.openai.conftest import client_for
from tests.server.conftest import DeviceGate, Server, metric, wait_for


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def test_wrong_key_is_authentication_error(server: Server) -> None:
    async with client_for(server, api_key="not-the-token") as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            await client.images.generate(prompt="a cat")
        assert raised.value.status_code == 401
        assert raised.value.code == "invalid_api_key"
        assert raised.value.type == "invalid_request_error"
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"size": "33x33"}, "size", "multiples of 8"),
        ({"size": "huge"}, "size", "WIDTHxHEIGHT"),
        ({"size": "2048x2048"}, "size", "from 8 to 1024"),
        ({"n": 10}, "n", "between 1 and 4"),
        ({"response_format": "gif"}, "response_format", "url, b64_json"),
        ({"output_format": "svg"}, "output_format", "png"),
        ({"background": "transparent"}, "background", "not supported"),
        ({"extra_body": {"steps": 0}}, "steps", "between 1"),
        ({"extra_body": {"priority": 10**9}}, "priority", "between"),
        ({"extra_body": {"colour": "blue"}}, "colour", "unrecognized"),
    ],
)
async def test_bad_generation_fields_name_the_param(
    client: openai.AsyncOpenAI, kwargs: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.images.generate(prompt="a cat", **kwargs)
    assert raised.value.param == param
    assert raised.value.type == "invalid_request_error"
    assert words in raised.value.message


async def test_empty_prompt_bad_partial_images_and_streamed_variation_refused(
    client: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.images.generate(prompt="   ")
    assert raised.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as raised:
        await client.images.generate(prompt="a cat", stream=True, partial_images=9)
    assert raised.value.param == "partial_images"
    source = png_bytes(Image.new("RGB", (32, 32)))
    with pytest.raises(openai.BadRequestError) as raised:
        await client.images.create_variation(
            image=("s.png", source, "image/png"), extra_body={"stream": "true"}
        )
    assert raised.value.param == "stream"


async def test_bad_edit_uploads(client: openai.AsyncOpenAI) -> None:
    source = png_bytes(Image.new("RGB", (32, 32), (1, 2, 3)))
    # A mask without alpha: OpenAI's convention needs transparent pixels; no guessing white/black.
    opaque_mask = png_bytes(Image.new("L", (32, 32), 255))
    with pytest.raises(openai.BadRequestError) as raised:
        await client.images.edit(
            image=("s.png", source, "image/png"), mask=("m.png", opaque_mask, "image/png"), prompt="x"
        )
    assert raised.value.param == "mask" and "alpha" in raised.value.message
    # A mask with alpha but no fully transparent pixel: nothing to edit.
    solid = png_bytes(Image.new("RGBA", (32, 32), (0, 0, 0, 255)))
    with pytest.raises(openai.BadRequestError) as raised:
        await client.images.edit(
            image=("s.png", source, "image/png"), mask=("m.png", solid, "image/png"), prompt="x"
        )
    assert raised.value.param == "mask" and "nothing to edit" in raised.value.message
    # A mask of another size.
    small = png_bytes(Image.new("RGBA", (16, 16), (0, 0, 0, 0)))
    with pytest.raises(openai.BadRequestError) as raised:
        await client.images.edit(
            image=("s.png", source, "image/png"), mask=("m.png", small, "image/png"), prompt="x"
        )
    assert raised.value.param == "mask"
    # Not an image at all.
    with pytest.raises(openai.BadRequestError) as raised:
        await client.images.create_variation(image=("s.png", b"hello, not a png", "image/png"))
    assert raised.value.param == "image"


async def test_oversized_upload_is_413(server_factory: Callable[..., Any]) -> None:
    async with server_factory(server={"max_body_bytes": 64 * 1024}) as server, client_for(server) as client:
        noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        big = png_bytes(Image.fromarray(noise))
        assert len(big) > 64 * 1024
        with pytest.raises(openai.APIStatusError) as raised:
            await client.images.create_variation(image=("big.png", big, "image/png"))
        assert raised.value.status_code == 413
        assert raised.value.code == "payload_too_large"
        assert "65536 bytes" in raised.value.message
        # The server keeps serving.
        assert len((await client.images.generate(prompt="a cat")).data) == 1


async def test_full_queue_is_rate_limit_with_retry_after(server_factory: Callable[..., Any]) -> None:
    async with (
        server_factory(batching={"max_queue": 1, "retry_after_s": 7}) as server,
        client_for(server) as client,
    ):
        gate = DeviceGate(server)
        running = asyncio.create_task(client.images.generate(prompt="first"))
        await gate.wait_entered()  # holds the device
        # Another size: it cannot join the running batch, so it waits in the (one-place) queue.
        queued = asyncio.create_task(client.images.generate(prompt="second", size="16x16"))
        await wait_for(lambda: server.app[keys.ENGINE].queue_depth == 1)
        try:
            with pytest.raises(openai.RateLimitError) as raised:
                await client.images.generate(prompt="third")
            assert raised.value.status_code == 429
            assert raised.value.response.headers["Retry-After"] == "7"
            assert raised.value.code == "rate_limit_exceeded"
            assert "queue is full" in raised.value.message
        finally:
            gate.open()
        # The admitted requests still complete.
        assert len((await running).data) == 1
        assert (await queued).size == "16x16"
        metrics = await server.metrics()
        assert metric(metrics, 'inference_requests_total{task="openai_generations",status="429"}') == 1


async def test_client_that_gives_up_has_its_queued_job_dropped(server: Server) -> None:
    gate = DeviceGate(server)
    async with client_for(server) as client:
        blocker = asyncio.create_task(client.images.generate(prompt="blocker"))
        await gate.wait_entered()
        try:
            # Another size, so it waits in the queue; the client gives up before the device is free.
            with pytest.raises(openai.APITimeoutError):
                await client.images.generate(prompt="impatient", size="16x16", timeout=0.5)
            # The device frees up only once the server has noticed the client leave: otherwise, on
            # a loaded machine, the queued job could be picked before its cancellation.
            await wait_for(lambda: metric_value(server, 'inference_errors_total{kind="client_gone"}'))
        finally:
            gate.open()
        await blocker
    # Dropped before it cost compute: counted as cancelled, and no 16x16 call ever ran.
    await wait_for(lambda: metric_value(server, 'inference_dropped_total{reason="cancelled"}'))
    values = await server.metrics()
    assert metric(values, 'inference_errors_total{kind="client_gone"}') == 1
    assert metric(values, "inference_images_total") == 1  # the blocker's (the warm-up is not counted)


def metric_value(server: Server, name: str) -> Any:
    async def read() -> float:
        return metric(await server.metrics(), name)

    return read()
