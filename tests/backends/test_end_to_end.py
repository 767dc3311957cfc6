"""The inference server client against the REAL inference server (tiny random pipeline) on loopback.

This is the pairing the bot runs in production: `InferenceServerBackend` -> aiohttp -> the server's
routes, auth, validation, batching engine and a real diffusers pipeline. Only the weights are tiny
and random (`inference_server.testing`), so the images are noise, but real PNGs of the asked size.
"""

from __future__ import annotations

import asyncio
import io

import pytest
from aiohttp.test_utils import TestServer
from PIL import Image, ImageChops

from bot.backends.base import BackendEvent, BackendRejected, GenerationParams
from bot.backends.inference_server import InferenceServerBackend
from inference_server import app as app_module
from inference_server import keys
from inference_server.config import Config
from inference_server.testing import save_tiny_pipeline

TOKEN = "e2e-token"
SIDE = 32  # the tiny pipeline's native size: the smallest images a real pipeline call makes


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))


@pytest.fixture
async def real_server(tiny_pipeline_dir):
    config = Config().replace(
        model={
            "path": str(tiny_pipeline_dir),
            "device": "cpu",
            "warmup": False,
            "width": SIDE,
            "height": SIDE,
        },
        # Every step reported, so the test sees the stream's progress events (production throttles).
        server={"progress_interval_s": 0.0},
        batching={"max_wait_ms": 0.0},
    )
    app = app_module.create_app(config, api_token=TOKEN)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    # Loading the tiny pipeline takes about a second; the limit only guards against a hang.
    await asyncio.wait_for(app[keys.ENGINE].wait_ready(), timeout=120)
    yield str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture
async def client(real_server):
    backend = InferenceServerBackend([real_server], token=TOKEN, max_retries=1, backoff_base_s=0.01)
    yield backend
    await backend.close()


def png_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img.size


async def test_txt2img_streams_progress_and_returns_seeded_images(client):
    events: list[BackendEvent] = []

    async def on_event(e: BackendEvent) -> None:
        events.append(e)

    params = GenerationParams("txt2img", "a red square", seeds=(42, 43), width=SIDE, height=SIDE, steps=3)
    streamed = await client.generate(params, on_event)
    assert [i.seed for i in streamed] == [42, 43]
    assert all(png_size(i.png) == (SIDE, SIDE) for i in streamed)
    assert streamed[0].png != streamed[1].png

    kinds = [e.kind for e in events]
    assert "started" in kinds and kinds.index("started") < kinds.index("progress")
    progress = [(e.step, e.total) for e in events if e.kind == "progress"]
    assert progress[-1] == (3, 3) and all(total == 3 for _, total in progress)
    assert [step for step, _ in progress] == sorted(step for step, _ in progress)

    # Same seeds without streaming: the same images (generation is deterministic per seed on CPU).
    plain = await client.generate(params)
    for a, b in zip(plain, streamed, strict=True):
        pa = Image.open(io.BytesIO(a.png)).convert("RGB")
        pb = Image.open(io.BytesIO(b.png)).convert("RGB")
        assert max(high for _, high in ImageChops.difference(pa, pb).getextrema()) <= 2


async def test_the_servers_previews_reach_the_bot_as_preview_events(client):
    events: list[BackendEvent] = []

    async def on_event(e: BackendEvent) -> None:
        events.append(e)

    # The server's default preview_every_steps (5): previews after steps 5 and 10 of 11, per image.
    params = GenerationParams("txt2img", "a red square", seeds=(1, 2), width=SIDE, height=SIDE, steps=11)
    await client.generate(params, on_event)
    previews = [e for e in events if e.kind == "preview"]
    assert sorted((e.step, e.extra["index"]) for e in previews) == [(5, 0), (5, 1), (10, 0), (10, 1)]
    assert all(e.total == 11 and png_size(e.extra["png"]) == (SIDE, SIDE) for e in previews)


async def test_img2img_and_inpaint_round_trip(client):
    source = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (0, 128, 255)).save(source, format="PNG")
    mask = io.BytesIO()
    Image.new("L", (SIDE, SIDE), 255).save(mask, format="PNG")
    [variation] = await client.generate(
        GenerationParams(
            "img2img", "blue", image=source.getvalue(), width=SIDE, height=SIDE, steps=2, strength=0.5
        )
    )
    assert png_size(variation.png) == (SIDE, SIDE)
    [painted] = await client.generate(
        GenerationParams(
            "inpaint", "sky", image=source.getvalue(), mask=mask.getvalue(), width=SIDE, height=SIDE, steps=2
        )
    )
    assert png_size(painted.png) == (SIDE, SIDE)


async def test_real_server_errors_reach_the_caller_as_backend_errors(real_server, client):
    with pytest.raises(BackendRejected) as info:
        await client.generate(GenerationParams("txt2img", "x", width=SIDE + 3, height=SIDE, steps=1))
    assert info.value.field == "width"
    assert "Traceback" not in info.value.message

    wrong = InferenceServerBackend([real_server], token="not-the-token", max_retries=0)
    try:
        with pytest.raises(BackendRejected) as info:
            await wrong.generate(GenerationParams("txt2img", "x", width=SIDE, height=SIDE, steps=1))
        assert "INFERENCE_API_TOKEN" in info.value.message
    finally:
        await wrong.close()


async def test_fails_over_from_a_dead_server_to_the_real_one(real_server, refused_url):
    backend = InferenceServerBackend([refused_url, real_server], token=TOKEN, max_retries=0)
    try:
        [image] = await backend.generate(GenerationParams("txt2img", "x", width=SIDE, height=SIDE, steps=1))
    finally:
        await backend.close()
    assert png_size(image.png) == (SIDE, SIDE)
    assert backend.servers_down() == [refused_url]


async def test_a_one_model_server_lists_its_model_and_jobs_without_a_model_go_out_as_before(client):
    """A server of one `[model]` is a registry of one (named after its folder): the bot learns that
    model as the default, a job naming it runs, and a job without a model sends no model fields."""
    [info] = await client.models() or []
    assert info.default and info.loaded and info.capabilities is not None and info.loras == ()
    images = await client.generate(
        GenerationParams(task="txt2img", prompt="a fox", seeds=(1,), width=SIDE, height=SIDE, steps=2)
    )
    named = await client.generate(
        GenerationParams(
            task="txt2img", prompt="a fox", seeds=(1,), width=SIDE, height=SIDE, steps=2, model=info.name
        )
    )
    assert len(images) == 1 and named[0].png == images[0].png
