"""OpenAI-API requests go through the same dynamic batcher as native ones, and batch with them."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from inference_server import keys
from tests.openai.conftest import client_for
from tests.server.conftest import DeviceGate, Server, metric, wait_for


async def test_several_clients_batched_together_and_with_native_requests(server: Server) -> None:
    engine = server.app[keys.ENGINE]
    gate = DeviceGate(server)
    async with (
        client_for(server) as first,
        client_for(server) as a,
        client_for(server) as b,
        client_for(server) as c,
    ):
        before = await server.metrics()
        # Hold the device with one request so the others queue up behind it.
        blocker = asyncio.create_task(first.images.generate(prompt="blocker"))
        await gate.wait_entered()
        openai_calls = [
            asyncio.create_task(a.images.generate(prompt="a red fox", n=2)),
            asyncio.create_task(b.images.generate(prompt="a blue whale", response_format="url")),
            asyncio.create_task(c.images.create_variation(image=_png(Image.new("RGB", (32, 32), (9, 9, 9))))),
        ]
        native = asyncio.create_task(server.generate("txt2img", {"prompt": "a green frog"}))
        try:
            await wait_for(lambda: engine.queue_depth == 4)  # requests, not images
        finally:
            gate.open()
        results = await asyncio.gather(*openai_calls)
        native_result = await native
        await blocker
        after = await server.metrics()

    fox, whale, variation = results
    assert len(fox.data) == 2 and whale.data[0].url and len(variation.data) == 1
    # Same task, size, steps and guidance: both OpenAI txt2img requests and the native one ran in ONE
    # pipeline call of 4 images; the variation (img2img) needs a call of its own. Plus the blocker's.
    assert native_result["batch_size"] == 4
    calls = metric(after, "inference_pipeline_calls_total") - metric(before, "inference_pipeline_calls_total")
    assert calls == 3
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(fox.data[0].b64_json))))
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0


def _png(img: Image.Image) -> tuple[str, bytes, str]:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return ("source.png", buf.getvalue(), "image/png")


async def test_continuous_engine_serves_the_openai_api(server_factory: Any) -> None:
    """The routes only use the Engine interface, so the continuous engine serves them too."""
    async with (
        server_factory(batching={"engine": "continuous", "max_batch_size": 4}) as server,
        client_for(server) as client,
    ):
        async with server.session.get(f"{server.url}/health") as resp:
            assert (await resp.json())["engine"] == "continuous"
        source = Image.new("RGBA", (32, 32), (30, 60, 200, 255))
        source.paste((0, 0, 0, 0), (8, 8, 24, 24))
        generated, edited, variation = await asyncio.gather(
            client.images.generate(prompt="a red fox", n=2, extra_body={"seed": 3}),
            client.images.edit(image=_png(source), prompt="a star", extra_body={"seed": 4}),
            client.images.create_variation(image=_png(source.convert("RGB"))),
        )
        assert len(generated.data) == 2 and len(edited.data) == 1 and len(variation.data) == 1
        out = np.asarray(
            Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).convert("RGB")
        ).astype(int)
        keep = np.ones((32, 32), bool)
        keep[8:24, 8:24] = False
        assert (out[keep] == np.array([30, 60, 200])).all()  # opaque pixels kept exactly
        stream = await client.images.generate(prompt="a red fox", stream=True, extra_body={"seed": 3})
        events = [event async for event in stream]
        assert [e.type for e in events] == ["image_generation.completed"]
