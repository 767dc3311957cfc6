"""One generation per task through the real inference server running the shipped model by default."""

from __future__ import annotations

import asyncio
import base64
import io

import aiohttp
import numpy as np
from aiohttp import web
from PIL import Image

from inference_server.app import create_app
from inference_server.config import BatchingConfig, Config, ModelConfig, ServerConfig
from inference_server.embedded.analyser import analyse

TOKEN = "model-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img.convert("RGB")


async def test_default_model_serves_txt2img_img2img_and_inpaint():
    # The default [model] path is "embedded": the server must load the shipped folder by itself.
    assert ModelConfig().path == "embedded"
    config = Config(
        server=ServerConfig(port=0, progress_interval_s=0.0),
        model=ModelConfig(steps=20, cpu_threads=1, warmup=False),
        batching=BatchingConfig(max_batch_size=4, max_wait_ms=10.0, max_queue=8),
    )
    app = create_app(config, api_token=TOKEN)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for _ in range(2400):  # at least 120 s: loading a model on a loaded CI machine
                async with session.get(f"{url}/ready") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)

            async def post(task: str, body: dict) -> Image.Image:
                async with session.post(f"{url}/v1/{task}", json=body) as resp:
                    payload = await resp.json()
                    assert resp.status == 200, payload
                assert (payload["width"], payload["height"]) == (64, 64)
                return _decode(payload["images"][0]["png_base64"])

            prompt = "a white square on a black background"
            image = await post("txt2img", {"prompt": prompt, "seed": 5})
            assert image.size == (64, 64)
            assert analyse(image).background == "black"

            variation = await post(
                "img2img", {"prompt": prompt, "seed": 6, "strength": 0.4, "image": _png_b64(image)}
            )
            assert analyse(variation).background == "black"

            mask = Image.new("L", (64, 64), 0)
            mask.paste(255, (0, 0, 64, 32))  # repaint the top half
            repainted = await post(
                "inpaint",
                {
                    "prompt": "a yellow circle on a green background",
                    "seed": 7,
                    "image": _png_b64(image),
                    "mask": _png_b64(mask),
                },
            )
            before, after = np.asarray(image, np.float32), np.asarray(repainted, np.float32)
            change = np.abs(after - before).mean(-1)
            assert change[:32].mean() > 2 * change[32:].mean()
    finally:
        await runner.cleanup()
