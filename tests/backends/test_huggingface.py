"""The Hugging Face backend: huggingface_hub's real client against a loopback fake of the Hub and
the Inference Providers router (fake_hf.py). Nothing here leaves 127.0.0.1."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from bot.backends.base import (
    BackendError,
    BackendEvent,
    BackendRejected,
    BackendUnavailable,
    GenerationParams,
    InferenceBackend,
    UnsupportedTask,
)
from bot.backends.huggingface import HuggingFaceBackend
from tests.backends.fake_hf import HF_TOKEN, answer, decoded_input, hang, image_bytes, seed_colour

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
FLUX = "black-forest-labs/FLUX.1-dev"
KLEIN = "black-forest-labs/FLUX.2-klein-9B"  # an image-to-image (editing) model
REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"


@pytest.fixture
async def make_backend(huggingface):
    made = []

    def make(**kw):
        kw.setdefault("model", SDXL)
        backend = HuggingFaceBackend(kw.pop("token", HF_TOKEN), **kw)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


def colour_of(png: bytes) -> tuple[int, int, int]:
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    return img.convert("RGB").getpixel((5, 5))


def near(a, b, tolerance=4) -> bool:  # JPEG is lossy; a flat colour survives within a few levels
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


async def test_hf_inference_text_to_image_in_the_routers_json_shape(huggingface, make_backend):
    huggingface.serve(SDXL, "hf-inference")
    backend = make_backend(provider="hf-inference")
    assert isinstance(backend, InferenceBackend)
    events: list[BackendEvent] = []

    async def on_event(e):
        events.append(e)

    params = GenerationParams(
        "txt2img", "a castle", negative_prompt="blurry", seeds=(3, 4), width=512, height=384, steps=25,
        guidance=5.0,
    )  # fmt: skip
    images = await backend.generate(params, on_event)

    assert [i.seed for i in images] == [3, 4]
    for image in images:
        assert Image.open(io.BytesIO(image.png)).size == (512, 384)
        assert near(colour_of(image.png), seed_colour(image.seed))  # the fake's JPEG, decoded
    assert [s.path for s in huggingface.seen] == [f"/hf-inference/models/{SDXL}"] * 2
    first = huggingface.seen[0]
    assert first.headers["Host"] == "router.huggingface.co"
    assert first.headers["Authorization"] == f"Bearer {HF_TOKEN}"
    assert [s.body for s in huggingface.seen] == [
        {
            "inputs": "a castle",
            "parameters": {
                "negative_prompt": "blurry",
                "height": 384,
                "width": 512,
                "num_inference_steps": 25,
                "guidance_scale": 5.0,
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


async def test_auto_takes_the_provider_the_hub_names_and_looks_it_up_once(huggingface, make_backend):
    huggingface.serve(FLUX, "fal-ai", provider_id="fal-ai/flux/dev")
    backend = make_backend(model=FLUX)  # provider "auto"
    for seed in (7, 8):
        [image] = await backend.generate(
            GenerationParams("txt2img", "a lion", seeds=(seed,), width=96, height=80, steps=28, guidance=3.5)
        )
        assert Image.open(io.BytesIO(image.png)).size == (96, 80)
        assert near(colour_of(image.png), seed_colour(seed))
    # fal-ai's contract: prompt at the top level, size as image_size, the image fetched from a url.
    assert [(s.provider, s.path) for s in huggingface.seen] == [("fal-ai", "/fal-ai/fal-ai/flux/dev")] * 2
    assert huggingface.seen[0].body == {
        "prompt": "a lion",
        "image_size": {"width": 96, "height": 80},
        "num_inference_steps": 28,
        "guidance_scale": 3.5,
        "seed": 7,
    }
    # The Hub lookups ran in a worker thread (on the loop they would wait forever for this fake,
    # which answers on the loop), for the first job only: the backend's, with the token (so the Hub
    # lists providers in the account's order), then the client's own, anonymous; both are cached.
    assert huggingface.hub_lookups == [(FLUX, f"Bearer {HF_TOKEN}"), (FLUX, None)]


async def test_auto_takes_the_first_provider_serving_the_task(huggingface, make_backend):
    huggingface.serve(FLUX, "fal-ai", task="image-to-image", provider_id="fal-ai/flux/dev/image-to-image")
    huggingface.serve(FLUX, "replicate", provider_id="black-forest-labs/flux-dev")
    [image] = await make_backend(model=FLUX).generate(GenerationParams("txt2img", "x", seeds=(4,)))
    assert near(colour_of(image.png), seed_colour(4))
    assert [s.provider for s in huggingface.seen] == ["replicate"]


async def test_replicate_gets_its_input_object(huggingface, make_backend):
    huggingface.serve(FLUX, "replicate", provider_id="black-forest-labs/flux-dev")
    [image] = await make_backend(model=FLUX, provider="replicate").generate(
        GenerationParams("txt2img", "a fox", negative_prompt="rain", seeds=(5,), width=72, height=64, steps=9)
    )
    assert near(colour_of(image.png), seed_colour(5))
    [seen] = huggingface.seen
    assert seen.path == "/replicate/v1/models/black-forest-labs/flux-dev/predictions"
    assert seen.headers["Prefer"] == "wait"
    assert seen.body == {
        "input": {
            "prompt": "a fox",
            "negative_prompt": "rain",
            "width": 72,
            "height": 64,
            "num_inference_steps": 9,
            "guidance_scale": 7.5,
            "seed": 5,
        }
    }


async def test_variations_on_hf_inference_use_the_image_to_image_model(huggingface, make_backend):
    huggingface.serve(SDXL, "hf-inference")
    huggingface.serve(REFINER, "hf-inference", task="image-to-image")
    source = image_bytes((64, 48), (10, 200, 30), "PNG")
    backend = make_backend(provider="hf-inference", image_to_image_model=REFINER)
    [image] = await backend.generate(
        GenerationParams(
            "img2img", "a castle", seeds=(9,), width=64, height=48, steps=12, strength=0.6, image=source
        )
    )
    assert near(colour_of(image.png), seed_colour(9))
    [seen] = huggingface.seen
    assert seen.path == f"/hf-inference/models/{REFINER}"
    assert base64.b64decode(seen.body["inputs"]) == source
    assert seen.body["parameters"] == {
        "prompt": "a castle",
        "target_size": {"width": 64, "height": 48},
        "num_inference_steps": 12,
        "guidance_scale": 7.5,
        "seed": 9,
        "strength": 0.6,
    }


async def test_variations_on_fal_ai_go_through_its_queue(huggingface, make_backend):
    huggingface.serve(KLEIN, "fal-ai", task="image-to-image", provider_id="fal-ai/flux-2/klein/9b/edit")
    source = image_bytes((64, 64), (10, 200, 30), "PNG")
    backend = make_backend(model=FLUX, provider="fal-ai", image_to_image_model=KLEIN)
    [image] = await backend.generate(GenerationParams("img2img", "a fox", seeds=(11,), image=source))
    assert near(colour_of(image.png), seed_colour(11))
    [seen] = huggingface.seen
    assert (seen.path, seen.query) == ("/fal-ai/fal-ai/flux-2/klein/9b/edit", {"_subdomain": "queue"})
    assert decoded_input(seen.body).tobytes() == Image.open(io.BytesIO(source)).tobytes()
    assert (seen.body["prompt"], seen.body["seed"], seen.body["strength"]) == ("a fox", 11, 0.6)
    assert seen.body["image_size"] == {"width": 64, "height": 64}


@pytest.mark.parametrize(
    ("provider", "serve", "why"),
    [
        # nscale has no image-to-image task in huggingface_hub's provider table at all.
        ("nscale", {"provider": "nscale"}, "Task 'image-to-image' not supported for provider 'nscale'"),
        # hf-inference checks the model's pipeline tag: this model is text-to-image.
        ("hf-inference", {"provider": "hf-inference"}, "doesn't support task 'image-to-image'"),
        # auto: the one provider serving the model serves it for text-to-image.
        (
            "auto",
            {"provider": "fal-ai"},
            f"no provider serves {SDXL} for image-to-image (fal-ai for text-to-image)",
        ),
    ],
)
async def test_variations_where_the_provider_cannot_are_unsupported(
    huggingface, make_backend, provider, serve, why
):
    huggingface.serve(SDXL, **serve)
    backend = make_backend(provider=provider)
    with pytest.raises(UnsupportedTask) as info:
        await backend.generate(GenerationParams("img2img", "x", image=image_bytes((64, 64), (1, 2, 3))))
    assert info.value.message.startswith("variations (image-to-image) are not available here")
    assert why in info.value.message and not info.value.retryable
    assert huggingface.seen == []  # refused before any image was paid for


async def test_inpainting_is_unsupported_without_asking_anyone(huggingface, make_backend):
    with pytest.raises(UnsupportedTask) as info:
        await make_backend().generate(
            GenerationParams(
                "inpaint", "x", image=image_bytes((64, 64), (1, 2, 3)), mask=image_bytes((64, 64), (9, 9, 9))
            )
        )
    assert info.value.message == "inpainting is not offered by Hugging Face Inference Providers"
    assert huggingface.seen == [] and huggingface.hub_lookups == []


async def test_base_url_posts_there_and_skips_the_hub(huggingface, make_backend):
    endpoint = f"{huggingface.url}/endpoints/my-sdxl"
    [image] = await make_backend(base_url=endpoint).generate(GenerationParams("txt2img", "x", seeds=(2,)))
    assert near(colour_of(image.png), seed_colour(2))
    [seen] = huggingface.seen
    assert seen.path == "/endpoints/my-sdxl" and seen.body["inputs"] == "x"
    assert huggingface.hub_lookups == []


async def test_a_model_the_hub_does_not_know_is_rejected(huggingface, make_backend):
    with pytest.raises(BackendRejected) as info:
        await make_backend(model="nobody/nothing").generate(GenerationParams("txt2img", "x"))
    assert info.value.message == "model nobody/nothing was not found on the Hugging Face Hub"
    assert info.value.field == "model" and huggingface.seen == []


async def test_a_bad_token_is_told_at_the_hub_lookup_already(huggingface, make_backend):
    huggingface.serve(FLUX, "fal-ai")
    with pytest.raises(BackendRejected) as info:
        await make_backend(model=FLUX, token="hf_revoked").generate(GenerationParams("txt2img", "x"))
    assert info.value.message.startswith("Hugging Face did not accept the token (HTTP 401")
    assert huggingface.hub_lookups == [(FLUX, "Bearer hf_revoked")] and huggingface.seen == []


async def test_a_model_the_provider_does_not_serve_is_rejected_before_calling_it(huggingface, make_backend):
    huggingface.serve(FLUX, "fal-ai")
    with pytest.raises(BackendRejected) as info:
        await make_backend(model=FLUX, provider="replicate").generate(GenerationParams("txt2img", "x"))
    assert info.value.message == f"Model {FLUX} is not supported by provider replicate"
    assert info.value.field == "model" and huggingface.seen == []


# The provider's answer -> (error class, retryable, field, words the user reads).
ROUTER_ERRORS = {
    "bad token": (
        answer(401, {"error": "Invalid credentials in Authorization header"}),
        BackendRejected, None,
        "Hugging Face did not accept the token (HTTP 401: Invalid credentials in Authorization header); "
        "check HUGGING_FACE_API_KEY or HF_TOKEN",
    ),
    "token without the permission": (
        answer(403, {"error": "This authentication method does not have sufficient permissions to call "
                              "Inference Providers on behalf of user alice"}),
        BackendRejected, None,
        'sufficient permissions to call Inference Providers on behalf of user alice); the token needs the '
        '"Make calls to Inference Providers" permission',
    ),
    "credits used up": (
        answer(402, {"error": "You have exceeded your monthly included credits for Inference Providers. "
                              "Subscribe to PRO to get 20x more monthly included credits."}),
        BackendRejected, None,
        "the Hugging Face account has no Inference Providers credits left (HTTP 402: You have exceeded",
    ),
    "model gone": (
        answer(404, {"error": "Model not found"}),
        BackendRejected, "model",
        f"model {SDXL} is not available from hf-inference (HTTP 404: Model not found)",
    ),
    "model not supported": (
        answer(400, {"error": f"Model {SDXL} is not supported by provider hf-inference."}),
        BackendRejected, "model",
        f"model {SDXL} is not available from hf-inference (HTTP 400: Model {SDXL} is not supported",
    ),
    "a parameter out of range": (
        answer(422, {"detail": [{"loc": ["body", "num_inference_steps"], "msg": "ensure this value is less than or equal to 50", "type": "value_error"}]}),
        BackendRejected, "steps",
        "hf-inference rejected the request (HTTP 422: num_inference_steps: ensure this value is less than or equal to 50)",
    ),
    "content refused": (
        answer(400, {"error": "Your prompt was flagged by our safety filter (NSFW content)."}),
        BackendRejected, "prompt",
        "hf-inference refused this prompt (content policy): Your prompt was flagged by our safety filter",
    ),
    "rate limited": (
        answer(429, {"error": "Rate limit reached"}, headers={"Retry-After": "12"}),
        BackendUnavailable, None,
        "rate limited by Hugging Face (hf-inference): Rate limit reached",
    ),
    "overloaded": (
        answer(503, {"error": "Service Unavailable"}),
        BackendUnavailable, None,
        "Hugging Face (hf-inference) failed (HTTP 503: Service Unavailable)",
    ),
    "crashed with a traceback": (
        answer(500, text="Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: CUDA out of memory\n"),
        BackendUnavailable, None,
        "Hugging Face (hf-inference) failed (HTTP 500: RuntimeError: CUDA out of memory)",
    ),
    "not an image": (
        answer(200, text="<html>maintenance</html>", headers={"Content-Type": "text/html"}),
        BackendError, None,
        "Hugging Face (hf-inference) answered with something that is not an image",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ROUTER_ERRORS))
async def test_router_errors_become_what_users_read(huggingface, make_backend, case):
    action, kind, field, words = ROUTER_ERRORS[case]
    huggingface.serve(SDXL, "hf-inference")
    huggingface.script = [action]
    token = "hf_revoked" if case == "bad token" else HF_TOKEN
    with pytest.raises(BackendError) as info:
        await make_backend(provider="hf-inference", token=token).generate(GenerationParams("txt2img", "x"))
    error = info.value
    assert type(error) is kind and error.retryable == (kind is BackendUnavailable)
    assert getattr(error, "field", None) == field
    assert words in error.message and "\n" not in error.message and not error.message.endswith(".")
    if case == "rate limited":
        assert error.retry_after_s == 12.0


async def test_a_long_rate_limit_is_told_not_waited(huggingface, make_backend):
    huggingface.serve(SDXL, "hf-inference")
    huggingface.script = [
        answer(429, {"error": "Rate limit reached"}, headers={"Retry-After": "600"}),
        # The router's own header: window used up (r=0), resets in 45 s.
        answer(429, {"error": "Too many requests"}, headers={"RateLimit": '"api";r=0;t=45'}),
        answer(429, {"error": "Too many requests"}),
    ]
    backend = make_backend(provider="hf-inference", retry_after_max_s=60)
    with pytest.raises(BackendRejected) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert info.value.message == "Hugging Face's rate limit was reached; try again in about 10 min"
    with pytest.raises(BackendUnavailable) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert info.value.retry_after_s == 45.0
    with pytest.raises(BackendUnavailable) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert info.value.retry_after_s is None  # no wait given: the dispatcher's own backoff


async def test_a_provider_that_does_not_answer_in_time_is_unavailable(huggingface, make_backend):
    huggingface.serve(SDXL, "hf-inference")
    huggingface.script = [hang(30)]
    backend = make_backend(provider="hf-inference", timeout_s=0.5)
    with pytest.raises(BackendUnavailable) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert info.value.message == "Hugging Face (hf-inference) did not answer within 0.5 s"
    assert info.value.retryable
    # The backend is still usable: the next call gets its image.
    assert len(await backend.generate(GenerationParams("txt2img", "x"))) == 1


async def test_an_unreachable_endpoint_is_unavailable(huggingface, make_backend, refused_url):
    with pytest.raises(BackendUnavailable) as info:
        await make_backend(base_url=f"{refused_url}/endpoint").generate(GenerationParams("txt2img", "x"))
    assert info.value.message == "cannot reach Hugging Face (hf-inference): ConnectError"
