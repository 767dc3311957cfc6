"""The shipped embedded model served through the same code path as any other model."""

from __future__ import annotations

from inference_server.config import Config, ModelConfig, ServerConfig
from tests.server.conftest import decode_png, running_server


async def test_embedded_model_serves_all_three_tasks() -> None:
    config = Config(server=ServerConfig(port=0), model=ModelConfig(path="embedded", cpu_threads=1, steps=2))
    async with running_server(config) as server:
        async with server.session.get(f"{server.url}/health") as resp:
            assert (await resp.json())["model"] == "embedded"
        body = await server.generate("txt2img", {"prompt": "a red circle on a white background", "seed": 1})
        image = decode_png(body["images"][0]["png_base64"])
        assert image.size == (64, 64)
        b64 = body["images"][0]["png_base64"]
        variation = await server.generate("img2img", {"prompt": "a red circle", "image": b64, "seed": 2})
        assert decode_png(variation["images"][0]["png_base64"]).size == (64, 64)
        from PIL import Image

        from tests.server.conftest import png_b64

        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        inpainted = await server.generate(
            "inpaint", {"prompt": "a blue square", "image": b64, "mask": png_b64(mask)}
        )
        assert decode_png(inpainted["images"][0]["png_base64"]).size == (64, 64)
