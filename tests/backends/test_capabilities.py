"""The inference-server backend learns what the model accepts from each server's /health."""

from __future__ import annotations

from typing import Any

import pytest

from bot.backends.base import ModelCapabilities
from bot.backends.inference_server import InferenceServerBackend, merge_capabilities
from tests.backends.fakes import TOKEN, FakeInferenceServer


def reported(**changes: Any) -> dict[str, Any]:
    """What the real server reports for a FLUX.1-dev model (the keys of handling.capabilities)."""
    caps = {
        "family": "flux-dev",
        "label": "FLUX.1-dev",
        "pipeline": "FluxPipeline",
        "tasks": ["txt2img", "img2img", "inpaint"],
        "size_multiple": 16,
        "native_width": 1024,
        "native_height": 1024,
        "default_width": 1024,
        "default_height": 1024,
        "min_side": 16,
        "max_side": 1024,
        "samplers": ["default", "flow_euler"],
        "default_sampler": "default",
        "flow_matching": True,
        "prediction": "flow",
        "guidance": "distilled",
        "negative_prompt": "true_cfg",
        "default_steps": 28,
        "default_guidance": 3.5,
        "default_strength": 0.6,
        "default_true_cfg": 4.0,
        "max_steps": 150,
        "max_guidance": 30.0,
        "max_images_per_request": 4,
        "max_prompt_chars": 1000,
    }
    return caps | changes


def test_from_json_reads_the_servers_report_and_names_a_bad_key() -> None:
    caps = ModelCapabilities.from_json(reported(tasks=["txt2img", "upscale"]))
    assert (caps.family, caps.size_multiple, caps.default_guidance, caps.tasks) == (
        "flux-dev",
        16,
        3.5,
        ("txt2img",),  # a task this bot doesn't know is not offered
    )
    with pytest.raises(ValueError, match="size_multiple"):
        ModelCapabilities.from_json(reported(size_multiple="16"))
    with pytest.raises(ValueError, match="default_steps"):
        ModelCapabilities.from_json(reported(default_steps=True))


def test_servers_that_differ_merge_to_what_all_accept() -> None:
    flux = ModelCapabilities.from_json(reported())
    sdxl = ModelCapabilities.from_json(
        reported(
            family="sdxl",
            label="SDXL",
            size_multiple=24,
            tasks=["txt2img", "img2img"],
            max_side=2048,
            max_steps=50,
        )
    )
    merged = merge_capabilities([flux, sdxl])
    assert merged.size_multiple == 48 and merged.tasks == ("txt2img", "img2img")
    assert (merged.max_side, merged.max_steps) == (1024, 50)
    assert merged.default_width % 48 == 0 and merged.family == "flux-dev"


async def test_capabilities_from_the_servers_that_answer(
    inference_server: FakeInferenceServer, second_inference_server: FakeInferenceServer, refused_url: str
) -> None:
    inference_server.capabilities = reported()
    second_inference_server.capabilities = None  # still loading: says nothing yet
    backend = InferenceServerBackend(
        [refused_url, inference_server.url, second_inference_server.url], token=TOKEN
    )
    try:
        caps = await backend.capabilities()
        assert caps == ModelCapabilities.from_json(reported())
        inference_server.capabilities = {"family": "broken"}
        assert await backend.capabilities() is None  # malformed is no report, never an exception
    finally:
        await backend.close()


async def test_the_bot_learns_the_model_once_the_server_has_loaded_it_and_keeps_it(
    inference_server: FakeInferenceServer, tmp_path: Any
) -> None:
    import asyncio

    from bot.core.model_watch import ModelWatch
    from tests.core.helpers import running_core

    backend = InferenceServerBackend([inference_server.url], token=TOKEN, max_retries=0)
    async with running_core(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", tmp_path, backend=backend) as (
        core,
        _,
    ):
        assert core.service.model is None  # the server is still loading: [bot]'s settings apply
        watch = ModelWatch(core.service, backend, interval_s=0.05, unknown_interval_s=0.05)
        await watch.start()
        try:
            inference_server.capabilities = reported()
            async with asyncio.timeout(60):  # only bounds a failure: a loaded CI machine is slow
                while core.service.model is None:  # noqa: ASYNC110 - the watch polls; nothing to await
                    await asyncio.sleep(0.01)
            assert core.service.model is not None and core.service.limits().size_multiple == 16
            inference_server.capabilities = None  # restarting: no report keeps the last known model
            await asyncio.sleep(0.2)
            assert core.service.model is not None and core.service.model.family == "flux-dev"
        finally:
            await watch.stop()
