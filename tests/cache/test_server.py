"""The `cache` option through the real server: the request field (native and OpenAI), its 400, the
`[model] cache` default, OpenAPI, and batches that group by cache level."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import yaml

from inference_server.config import load_config
from inference_server.config_loader import ConfigError
from inference_server.keys import ENGINE
from inference_server.routing import ModelRoutingEngine
from inference_server.step_cache import unet_full_step
from tests.server.conftest import AUTH, Server, decode_png, generate_together, metric


async def test_unknown_level_is_a_400_naming_the_field(server: Server) -> None:
    async with await server.post("txt2img", {"prompt": "x", "cache": "fastest"}) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["field"] == "cache"
    assert "off, fast, faster" in body["error"]["message"]


async def test_openai_route_takes_cache_as_an_extension(server: Server) -> None:
    url = f"{server.url}/v1/images/generations"
    async with server.session.post(url, json={"prompt": "x", "cache": "fast"}, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
    async with server.session.post(url, json={"prompt": "x", "cache": "nope"}, headers=AUTH) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["param"] == "cache"


async def test_openapi_documents_the_field(server: Server) -> None:
    async with server.session.get(f"{server.url}/openapi.yaml") as resp:
        doc = yaml.safe_load(await resp.text())
    text = yaml.safe_dump(doc)
    assert "cache" in text and "faster" in text


async def test_levels_group_into_their_own_batches(server_factory: Any) -> None:
    async with server_factory(batching={"max_wait_ms": 1000.0}, model={"steps": 4}) as server:
        bodies = [
            {"prompt": f"p{i}", "seed": i, "cache": level} for i, level in enumerate(["off", "fast"] * 2)
        ]
        results = await generate_together(server, bodies)  # they meet however busy the machine
        calls = metric(await server.metrics(), "inference_pipeline_calls_total")
    assert [r["batch_size"] for r in results] == [2, 2, 2, 2]
    assert calls == 2 + 1  # and the holder's


async def test_server_default_applies_and_a_request_overrides_it(server_factory: Any) -> None:
    body = {"prompt": "a red circle", "seed": 7, "steps": 6}
    async with server_factory(model={"cache": "faster"}) as server:
        by_default = decode_png((await server.generate("txt2img", body))["images"][0]["png_base64"])
        asked_off = decode_png(
            (await server.generate("txt2img", {**body, "cache": "off"}))["images"][0]["png_base64"]
        )
    async with server_factory() as server:
        plain = decode_png((await server.generate("txt2img", body))["images"][0]["png_base64"])
    # "off" on a caching server is exactly a server that never caches; its default is not.
    assert np.array_equal(np.asarray(asked_off), np.asarray(plain))
    assert not np.array_equal(np.asarray(by_default), np.asarray(plain))


async def test_the_continuous_engine_runs_cached_requests_itself(server_factory: Any) -> None:
    """A cached request on the continuous engine caches there (per-sample state), not on the
    request-level engine, and its image is the request-level engine's cached image for the seed."""
    body = {"prompt": "a red circle", "seed": 7, "steps": 6}
    async with server_factory(batching={"engine": "continuous"}) as server:
        routing = server.app[ENGINE]
        assert isinstance(routing, ModelRoutingEngine)
        core = routing.primary._core  # type: ignore[attr-defined]
        continuous_plain = decode_png((await server.generate("txt2img", body))["images"][0]["png_base64"])
        continuous_cached = decode_png(
            (await server.generate("txt2img", {**body, "cache": "faster"}))["images"][0]["png_base64"]
        )
        reused = core.cache_reused_steps
    async with server_factory() as server:
        cached = decode_png(
            (await server.generate("txt2img", {**body, "cache": "faster"}))["images"][0]["png_base64"]
        )
    # Every step the level's schedule doesn't compute in full reused the cached features (6 steps
    # at "faster": steps 2, 3 and 5 today).
    assert reused == sum(not unet_full_step("faster", i, 6) for i in range(6)) > 0
    # Same computation batched differently (float rounding ~1e-6) can move a pixel by one 8-bit level.
    a, b = np.asarray(continuous_cached, np.int16), np.asarray(cached, np.int16)
    assert np.abs(a - b).max() <= 1
    assert not np.array_equal(np.asarray(continuous_cached), np.asarray(continuous_plain))


def test_config_key_is_checked() -> None:
    assert load_config({"model": {"cache": "fast"}}).model.cache == "fast"
    with pytest.raises(ConfigError, match=r"\[model\] cache: must be one of off, fast, faster"):
        load_config({"model": {"cache": "turbo"}})
