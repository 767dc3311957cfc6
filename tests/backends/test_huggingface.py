"""The Hugging Face backend against a loopback fake of the HF Inference API text-to-image route."""

from __future__ import annotations

import io

import pytest
from aiohttp import web
from PIL import Image

from bot.backends.base import (
    BackendEvent,
    BackendRejected,
    BackendUnavailable,
    GenerationParams,
    InferenceBackend,
    UnsupportedTask,
)
from bot.backends.huggingface import HuggingFaceBackend
from tests.backends.fakes import HF_KEY, png_bytes

MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


@pytest.fixture
async def make_backend(huggingface, sleeps):
    made = []

    def make(**kw):
        kw.setdefault("model", MODEL)
        kw.setdefault("base_url", huggingface.url)
        kw.setdefault("sleep", sleeps)
        backend = HuggingFaceBackend(kw.pop("api_key", HF_KEY), **kw)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


async def test_one_call_per_image_with_its_seed_and_jpeg_converted_to_png(huggingface, make_backend):
    backend = make_backend()
    assert isinstance(backend, InferenceBackend)
    events: list[BackendEvent] = []

    async def on_event(e):
        events.append(e)

    params = GenerationParams(
        "txt2img",
        "a castle",
        negative_prompt="blurry",
        seeds=(3, 4),
        width=512,
        height=384,
        steps=25,
        guidance=5.0,
    )
    images = await backend.generate(params, on_event)
    assert [i.seed for i in images] == [3, 4]
    for image, seed in zip(images, (3, 4), strict=True):
        img = Image.open(io.BytesIO(image.png))
        assert img.format == "PNG" and img.size == (512, 384)
        assert abs(img.getpixel((10, 10))[0] - seed) <= 3  # JPEG is lossy; the colour survives
    assert [r.path for r in huggingface.seen] == [f"/models/{MODEL}"] * 2
    assert huggingface.seen[0].headers["Authorization"] == f"Bearer {HF_KEY}"
    assert [r.body for r in huggingface.seen] == [
        {
            "inputs": "a castle",
            "parameters": {
                "negative_prompt": "blurry",
                "num_inference_steps": 25,
                "guidance_scale": 5.0,
                "width": 512,
                "height": 384,
                "seed": seed,
            },
        }
        for seed in (3, 4)
    ]
    assert [(e.kind, e.step, e.total) for e in events] == [
        ("started", None, None),
        ("progress", 1, 2),
        ("progress", 2, 2),
    ]


async def test_png_answers_pass_through_untouched(huggingface, make_backend):
    huggingface.image_format = "PNG"
    [image] = await make_backend().generate(GenerationParams("txt2img", "x", seeds=(9,)))
    assert image.png == png_bytes((64, 64), (9, 50, 50), "PNG")


async def test_waits_for_a_loading_model_then_succeeds(huggingface, make_backend, sleeps):
    async def loading(request, body):
        return web.json_response(
            {"error": f"Model {MODEL} is currently loading", "estimated_time": 21.5}, status=503
        )

    huggingface.script = [loading, loading]
    images = await make_backend().generate(GenerationParams("txt2img", "x"))
    assert len(images) == 1 and len(huggingface.seen) == 3
    assert sleeps.delays == [21.5, 21.5]


async def test_gives_up_when_the_model_keeps_loading(huggingface, make_backend, sleeps):
    async def loading(request, body):
        return web.json_response({"error": "Model is currently loading", "estimated_time": 40}, status=503)

    huggingface.script = [loading] * 10
    with pytest.raises(BackendUnavailable) as info:
        await make_backend(max_loading_wait_s=100).generate(GenerationParams("txt2img", "x"))
    assert "still loading" in info.value.message and MODEL in info.value.message
    assert sum(sleeps.delays) == 100  # bounded by max_loading_wait_s


async def test_429_is_retried_after_retry_after(huggingface, make_backend, sleeps):
    async def rate_limited(request, body):
        return web.json_response({"error": "Rate limit reached"}, status=429, headers={"Retry-After": "4"})

    huggingface.script = [rate_limited]
    assert len(await make_backend().generate(GenerationParams("txt2img", "x"))) == 1
    assert sleeps.delays == [4.0]


async def test_persistent_server_errors_become_unavailable(huggingface, make_backend, sleeps):
    async def broken(request, body):
        return web.json_response({"error": "internal"}, status=500)

    huggingface.script = [broken] * 10
    with pytest.raises(BackendUnavailable) as info:
        await make_backend().generate(GenerationParams("txt2img", "x"))
    assert "HTTP 500" in info.value.message and info.value.retryable
    assert len(huggingface.seen) == 4 and len(sleeps.delays) == 3


async def test_bad_key_is_rejected_clearly(huggingface, make_backend, sleeps):
    with pytest.raises(BackendRejected) as info:
        await make_backend(api_key="hf_wrong").generate(GenerationParams("txt2img", "x"))
    assert "invalid Hugging Face API key" in info.value.message
    assert "HUGGING_FACE_API_KEY" in info.value.message and sleeps.delays == []


async def test_bad_input_and_unknown_model_are_rejected(huggingface, make_backend):
    async def bad_size(request, body):
        return web.json_response({"error": "width must be divisible by 8"}, status=400)

    async def missing(request, body):
        return web.json_response({"error": "Model not found"}, status=404)

    huggingface.script = [bad_size, missing]
    backend = make_backend()
    with pytest.raises(BackendRejected) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert info.value.field == "width" and "divisible by 8" in info.value.message
    with pytest.raises(BackendRejected) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert info.value.field == "model" and MODEL in info.value.message


async def test_img2img_and_inpaint_are_unsupported(huggingface, make_backend):
    backend = make_backend()
    for task in ("img2img", "inpaint"):
        with pytest.raises(UnsupportedTask) as info:
            await backend.generate(GenerationParams(task, "x", image=png_bytes(), mask=png_bytes()))
        assert f"{task} is not supported by the Hugging Face backend" in info.value.message
    assert huggingface.seen == []


async def test_unreachable_api_is_unavailable(refused_url, sleeps):
    backend = HuggingFaceBackend(HF_KEY, model=MODEL, base_url=refused_url, sleep=sleeps)
    try:
        with pytest.raises(BackendUnavailable) as info:
            await backend.generate(GenerationParams("txt2img", "x"))
    finally:
        await backend.close()
    assert "cannot connect" in info.value.message and len(sleeps.delays) == 3
