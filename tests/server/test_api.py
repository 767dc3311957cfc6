"""The /v1 API end to end over loopback, with a real (tiny) diffusers pipeline."""

from __future__ import annotations

import aiohttp
import numpy as np
from PIL import Image

from tests.server.conftest import AUTH, Server, decode_png, metric, parse_metrics, png_b64


async def test_txt2img_returns_pngs_with_seeds_and_timings(server: Server) -> None:
    body = await server.generate("txt2img", {"prompt": "a red circle", "n": 2, "seed": 41, "steps": 2})
    assert [img["seed"] for img in body["images"]] == [41, 42]
    images = [decode_png(img["png_base64"]) for img in body["images"]]
    assert all(img.size == (32, 32) and img.mode == "RGB" for img in images)
    assert np.asarray(images[0]).std() > 0  # a real picture, not a blank
    assert (body["width"], body["height"], body["steps"]) == (32, 32, 2)
    assert body["batch_size"] >= 2
    assert set(body["timings"]) == {"queue_s", "run_s", "total_s"}
    assert body["timings"]["total_s"] >= body["timings"]["run_s"] > 0


async def test_same_seed_same_image_and_random_seed_reported(server: Server) -> None:
    a = await server.generate("txt2img", {"prompt": "a cat", "seed": 7})
    b = await server.generate("txt2img", {"prompt": "a cat", "seed": 7})
    assert a["images"][0]["png_base64"] == b["images"][0]["png_base64"]
    c = await server.generate("txt2img", {"prompt": "a cat"})
    seed = c["images"][0]["seed"]
    assert 0 <= seed < 2**32
    again = await server.generate("txt2img", {"prompt": "a cat", "seed": seed})
    assert again["images"][0]["png_base64"] == c["images"][0]["png_base64"]


async def test_img2img_json_and_multipart(server: Server) -> None:
    source = Image.new("RGB", (32, 32), (200, 30, 30))
    body = {"prompt": "a blue square", "image": png_b64(source), "seed": 3, "strength": 0.5, "steps": 4}
    as_json = await server.generate("img2img", body)
    assert len(as_json["images"]) == 1
    assert decode_png(as_json["images"][0]["png_base64"]).size == (32, 32)

    form = aiohttp.FormData()
    form.add_field("prompt", "a blue square")
    form.add_field("seed", "3")
    form.add_field("strength", "0.5")
    form.add_field("steps", "4")
    buf = __import__("io").BytesIO()
    source.save(buf, format="PNG")
    form.add_field("image", buf.getvalue(), filename="in.png", content_type="image/png")
    async with await server.post("img2img", data=form) as resp:
        payload = await resp.json()
        assert resp.status == 200, payload
    # The same inputs through either encoding give the same picture.
    assert payload["images"][0]["png_base64"] == as_json["images"][0]["png_base64"]


async def test_img2img_resizes_to_requested_size(server: Server) -> None:
    source = Image.new("RGB", (48, 40), (10, 120, 10))
    body = await server.generate(
        "img2img",
        {
            "prompt": "grass",
            "image": png_b64(source, "JPEG"),
            "width": 32,
            "height": 32,
            "steps": 2,
            "strength": 1.0,
        },
    )
    assert decode_png(body["images"][0]["png_base64"]).size == (32, 32)


async def test_inpaint_keeps_pixels_outside_the_mask(server: Server) -> None:
    source = Image.new("RGB", (32, 32), (30, 60, 200))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))  # repaint the centre only
    body = await server.generate(
        "inpaint",
        {
            "prompt": "a yellow star",
            "image": png_b64(source),
            "mask": png_b64(mask),
            "seed": 1,
            "steps": 4,
            "strength": 1.0,
        },
    )
    out = np.asarray(decode_png(body["images"][0]["png_base64"])).astype(int)
    keep = np.asarray(mask) == 0
    assert (out[keep] == np.array([30, 60, 200])).all()
    assert np.abs(out[~keep] - np.array([30, 60, 200])).max() > 0  # the centre was repainted


async def test_health_ready_openapi_and_metrics(server: Server) -> None:
    async with server.session.get(f"{server.url}/health") as resp:
        health = await resp.json()
    assert health["status"] == "ok"
    assert health["device"] == "cpu" and health["dtype"] == "float32"
    assert health["attention"] == "sdpa"
    assert health["engine"] == "dynamic" and health["max_batch_size"] == 8
    assert health["queue_depth"] == 0
    async with server.session.get(f"{server.url}/ready") as resp:
        assert resp.status == 200
    async with server.session.get(f"{server.url}/openapi.yaml") as resp:
        text = await resp.text()
        assert resp.status == 200 and "openapi: 3.1" in text and "/v1/txt2img" in text
    await server.generate("txt2img", {"prompt": "x"})
    async with server.session.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert resp.content_type == "text/plain"
    assert "# TYPE inference_queue_wait_seconds histogram" in text
    values = parse_metrics(text)
    assert metric(values, 'inference_requests_total{task="txt2img",status="200"}') == 1
    assert metric(values, "inference_batch_size_count") == 1
    assert values["inference_queue_depth"] == 0 and values["inference_ready"] == 1
    # A scraper that asks for OpenMetrics gets it.
    async with server.session.get(
        f"{server.url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    ) as resp:
        assert resp.content_type == "application/openmetrics-text"
        assert (await resp.text()).endswith("# EOF\n")


async def test_unknown_route_is_json_404(server: Server) -> None:
    async with server.session.get(f"{server.url}/v1/nope", headers=AUTH) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"


async def test_explicit_seeds_pick_each_image(server: Server) -> None:
    both = await server.generate("txt2img", {"prompt": "a moon", "seeds": [9, 4]})
    assert [img["seed"] for img in both["images"]] == [9, 4]
    alone = await server.generate("txt2img", {"prompt": "a moon", "seed": 4})
    a = np.asarray(decode_png(alone["images"][0]["png_base64"])).astype(int)
    b = np.asarray(decode_png(both["images"][1]["png_base64"])).astype(int)
    assert np.abs(a - b).max() <= 1  # the same image; 8-bit rounding of ~1e-6 float noise at most
