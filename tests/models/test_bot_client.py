"""The bot's inference-server client against the REAL registry server (tiny SD 1.5 as the default,
tiny SDXL loaded lazily, LoRAs made with PEFT): what the bot learns from /v1/models, and that jobs
naming a model and LoRAs reach it, including a model that has not been loaded yet."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest
from PIL import Image

from bot.backends.base import BackendRejected, GenerationParams, LoraSpec
from bot.backends.inference_server import InferenceServerBackend
from tests.server.conftest import TOKEN, Server


@pytest.fixture
async def client(server: Server) -> AsyncIterator[InferenceServerBackend]:
    backend = InferenceServerBackend([server.url], token=TOKEN, max_retries=0)
    yield backend
    await backend.close()


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def job(**changes: object) -> GenerationParams:
    base: dict[str, object] = {
        "task": "txt2img",
        "prompt": "a fox",
        "seeds": (1,),
        "width": 64,
        "height": 64,
        "steps": 2,
    }
    return GenerationParams(**{**base, **changes})  # type: ignore[arg-type]


async def test_the_bot_learns_both_models_a_lazy_one_without_capabilities_until_it_loads(client):
    models = {m.name: m for m in await client.models() or []}
    assert list(models) == ["sd15", "xl"]  # the default first
    sd15, xl = models["sd15"], models["xl"]
    assert sd15.default and sd15.loaded and sd15.capabilities is not None
    assert sd15.capabilities.family == "sd" and sd15.loras == ("detail", "style")
    # Not loaded yet: listed (so users can pick it), its family read from its config files, and no
    # capabilities until the pipeline is loaded; the bot's own settings apply to it until then.
    assert not xl.default and not xl.loaded and xl.capabilities is None
    assert xl.family == "sdxl" and xl.loras == ("xlstyle",)

    [image] = await client.generate(job(model="xl", loras=(LoraSpec("xlstyle", 0.5),)))
    assert png_size(image.png) == (64, 64)
    xl = {m.name: m for m in await client.models() or []}["xl"]
    assert xl.loaded and xl.capabilities is not None and xl.capabilities.family == "sdxl"


async def test_a_job_with_loras_on_the_default_model_runs(client):
    [plain] = await client.generate(job(model="sd15"))
    [styled] = await client.generate(
        job(model="sd15", loras=(LoraSpec("style", 1.0), LoraSpec("detail", 0.5)))
    )
    assert png_size(styled.png) == (64, 64) and styled.png != plain.png


async def test_unknown_model_and_misfit_lora_are_refusals_that_name_them(client):
    with pytest.raises(BackendRejected) as unknown:
        await client.generate(job(model="nope"))
    assert "nope" in str(unknown.value) and "sd15" in str(unknown.value)
    with pytest.raises(BackendRejected) as misfit:
        await client.generate(job(model="sd15", loras=(LoraSpec("xlstyle", 1.0),)))
    assert "xlstyle" in str(misfit.value)
