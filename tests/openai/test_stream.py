"""`stream=True` with the official client: OpenAI's server-sent events from the same engine."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from inference_server import keys
from tests.server.conftest import DeviceGate, Server, wait_for


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


async def test_streamed_generation_ends_with_completed_images(client: openai.AsyncOpenAI) -> None:
    extras = {"seed": 99, "steps": 3}
    stream = await client.images.generate(
        prompt="a boat", n=2, stream=True, partial_images=2, extra_body=extras
    )
    events = [event async for event in stream]
    # 3 steps, 2 partials: a preview of each image after steps 1 and 2, then one completed per image.
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert [e.type for e in events[-2:]] == ["image_generation.completed"] * 2 and len(events) == 6
    assert sorted(e.partial_image_index for e in partials) == [0, 0, 1, 1]
    for e in partials:
        preview = Image.open(io.BytesIO(base64.b64decode(e.b64_json)))
        assert preview.format == "PNG" and preview.size == (32, 32) and e.size == "32x32"
    assert all(e.size == "32x32" and e.output_format == "png" for e in completed)
    plain = await client.images.generate(prompt="a boat", n=2, extra_body=extras)
    # The same seeds give the same pictures as the non-streamed call.
    for event, item in zip(completed, plain.data, strict=True):
        assert (pixels(event.b64_json) == pixels(item.b64_json)).all()


async def test_streamed_edit(client: openai.AsyncOpenAI) -> None:
    source = Image.new("RGBA", (32, 32), (30, 60, 200, 255))
    source.paste((0, 0, 0, 0), (0, 0, 32, 8))
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    stream = await client.images.edit(
        image=("s.png", buf.getvalue(), "image/png"), prompt="sky", stream=True, output_format="webp"
    )
    events = [event async for event in stream]
    # No partial_images asked for (OpenAI's default is 0): no previews.
    assert [e.type for e in events] == ["image_edit.completed"]
    assert Image.open(io.BytesIO(base64.b64decode(events[0].b64_json))).format == "WEBP"


async def test_partial_images_capped_at_the_number_asked_for(client: openai.AsyncOpenAI) -> None:
    stream = await client.images.edit(
        image=("s.png", _opaque_png(), "image/png"),
        prompt="sky",
        stream=True,
        partial_images=1,
        extra_body={"steps": 6, "strength": 1.0, "seed": 4},
    )
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert events[0].partial_image_index == 0


def _opaque_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (30, 60, 200)).save(buf, format="PNG")
    return buf.getvalue()


async def test_error_after_admission_arrives_as_an_error_event(
    server: Server, client: openai.AsyncOpenAI
) -> None:
    gate = DeviceGate(server)
    blocker = asyncio.create_task(client.images.generate(prompt="blocker"))
    await gate.wait_entered()
    try:
        # Another size, so it queues behind the blocker, and a deadline it cannot meet.
        stream = await client.images.generate(
            prompt="late", size="16x16", stream=True, extra_body={"timeout_s": 0.3}
        )
        with pytest.raises(openai.APIError) as raised:
            async for _ in stream:
                pass
        assert raised.value.code == "deadline_exceeded"
        assert "deadline" in raised.value.message
    finally:
        gate.open()
    assert len((await blocker).data) == 1
    await wait_for(lambda: server.app[keys.ENGINE].queue_depth == 0)
