"""The registry over HTTP: two model families side by side in one real server, `model` and `loras`
on the native and OpenAI routes, GET /v1/models, /health, and every 400 the contract names."""

from __future__ import annotations

from typing import Any

import numpy as np

from inference_server import keys
from tests.server.conftest import AUTH, Server, decode_png


async def models(server: Server) -> dict[str, Any]:
    async with server.session.get(f"{server.url}/v1/models", headers=AUTH) as r:
        assert r.status == 200
        return await r.json()


def pixels(result: dict[str, Any]) -> np.ndarray:
    return np.asarray(decode_png(result["images"][0]["png_base64"]), dtype=np.int16)


async def error(server: Server, body: dict[str, Any], route: str = "txt2img") -> dict[str, Any]:
    r = await server.post(route, body)
    assert r.status == 400, await r.text()
    return (await r.json())["error"]


async def test_models_lists_both_with_their_loras(server: Server) -> None:
    listing = await models(server)
    assert listing["object"] == "list"
    by_id = {m["id"]: m for m in listing["data"]}
    assert list(by_id) == ["sd15", "xl"]
    sd15, xl = by_id["sd15"], by_id["xl"]
    assert sd15["object"] == "model" and sd15["owned_by"] == "imagine" and isinstance(sd15["created"], int)
    assert (sd15["default"], sd15["loaded"], sd15["family"]) == (True, True, "sd")
    assert sd15["capabilities"]["family"] == "sd" and sd15["capabilities"]["default_width"] == 64
    # LoRAs are listed under the models they fit: the SDXL one only under the SDXL model.
    assert sd15["loras"] == ["detail", "style"]
    assert xl["loras"] == ["xlstyle"]
    # The SDXL model loads lazily, on its first request; its family is read from its config files.
    assert (xl["default"], xl["loaded"], xl["family"], xl["capabilities"]) == (False, False, "sdxl", None)

    async with server.session.get(f"{server.url}/v1/models/xl", headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["id"] == "xl"
    async with server.session.get(f"{server.url}/v1/models/nope", headers=AUTH) as r:
        assert r.status == 404
        assert "sd15, xl" in (await r.json())["error"]["message"]


async def test_health_names_the_models_and_the_default(server: Server) -> None:
    async with server.session.get(f"{server.url}/health") as r:
        health = await r.json()
    assert health["models"] == ["sd15", "xl"]
    assert health["default_model"] == "sd15"
    assert health["capabilities"]["family"] == "sd"


async def test_a_request_names_its_model(server: Server) -> None:
    result = await server.generate("txt2img", {"prompt": "a cat", "model": "xl", "seed": 1})
    assert result["model"] == "xl"
    assert (result["width"], result["height"]) == (64, 64)
    xl = {m["id"]: m for m in (await models(server))["data"]}["xl"]
    assert (xl["loaded"], xl["family"]) == (True, "sdxl")
    assert xl["capabilities"]["pipeline"] == "StableDiffusionXLPipeline"
    default = await server.generate("txt2img", {"prompt": "a cat", "seed": 1})
    assert default["model"] == "sd15"
    named = await server.generate("txt2img", {"prompt": "a cat", "seed": 1, "model": "sd15"})
    assert np.array_equal(pixels(default), pixels(named))
    metrics = await server.metrics()
    assert metrics['inference_model_load_seconds_count{model="xl"}'] == 1
    assert metrics['inference_model_load_seconds_count{model="sd15"}'] == 1


async def test_openai_route_takes_a_model_and_openai_names_mean_the_default(server: Server) -> None:
    async def generate(body: dict[str, Any]) -> Any:
        return await server.session.post(
            f"{server.url}/v1/images/generations",
            json={"prompt": "a cat", "seed": 3, "response_format": "b64_json", **body},
            headers=AUTH,
        )

    for name in ("dall-e-3", "gpt-image-1", None):
        r = await generate({} if name is None else {"model": name})
        assert r.status == 200, await r.text()
    r = await generate({"model": "xl", "loras": [{"name": "xlstyle", "weight": 1.0}]})
    assert r.status == 200, await r.text()
    r = await generate({"model": "midjourney-v6"})
    assert r.status == 400
    body = (await r.json())["error"]
    assert (body["code"], body["param"]) == ("unknown_model", "model")
    assert "sd15, xl" in body["message"]


async def test_unknown_model_is_a_400_listing_the_names(server: Server) -> None:
    for value in ("sdxl", 3, ["sd15"]):
        e = await error(server, {"prompt": "x", "model": value})
        assert (e["code"], e["field"]) == ("unknown_model", "model")
        assert "sd15, xl" in e["message"]


async def test_lora_errors_name_the_entry(server: Server) -> None:
    cases = [
        ([{"name": "nope", "weight": 1}], "unknown_lora", "loras[0].name", "style"),
        (
            [{"name": "style", "weight": 1}, {"name": "xlstyle", "weight": 1}],
            "invalid_lora",
            "loras[1].name",
            "64-wide",
        ),
        ([{"name": "style", "weight": 2.5}], "invalid_lora", "loras[0].weight", "-2 to 2"),
        ([{"name": "style", "weight": -3}], "invalid_lora", "loras[0].weight", "-2 to 2"),
        ([{"name": "style", "weight": "1"}], "invalid_lora", "loras[0].weight", "number"),
        ([{"name": "style", "weight": True}], "invalid_lora", "loras[0].weight", "number"),
        ([{"name": "style"}, {"name": "style"}], "invalid_lora", "loras[1].name", "twice"),
        ([{"weight": 1}], "invalid_lora", "loras[0].name", "name"),
        ([{"name": "style", "scale": 1}], "invalid_lora", "loras[0].scale", "unknown field"),
        ("style", "invalid_lora", "loras", "list"),
        ([{"name": n} for n in ("a", "b", "c", "d", "e")], "invalid_lora", "loras", "at most 4"),
    ]
    for loras, code, field, words in cases:
        e = await error(server, {"prompt": "x", "loras": loras})
        assert (e["code"], e["field"]) == (code, field), (loras, e)
        assert words in e["message"], (loras, e["message"])
    # The SD 1.5 LoRA on the SDXL model: wrong family, named.
    e = await error(server, {"prompt": "x", "model": "xl", "loras": [{"name": "style", "weight": 1}]})
    assert (e["code"], e["field"]) == ("invalid_lora", "loras[0].name")
    assert "'style'" in e["message"] and "'xl'" in e["message"]


async def test_lora_weight_zero_is_the_base_image_and_loras_compose(server: Server) -> None:
    async def image(loras: list[dict[str, Any]] | None) -> np.ndarray:
        body: dict[str, Any] = {"prompt": "a red circle", "seed": 7}
        if loras is not None:
            body["loras"] = loras
        return pixels(await server.generate("txt2img", body))

    base = await image(None)
    style = await image([{"name": "style", "weight": 1.0}])
    zero = await image([{"name": "style", "weight": 0.0}])
    detail = await image([{"name": "detail", "weight": 1.0}])
    both = await image([{"name": "style", "weight": 1.0}, {"name": "detail", "weight": 1.0}])
    again = await image(None)
    assert np.array_equal(zero, base), "weight 0 must leave the model as it is"
    assert np.abs(style - base).mean() > 1, "weight 1 must change the image"
    assert not np.array_equal(detail, style)
    assert not np.array_equal(both, style) and not np.array_equal(both, detail)
    assert np.array_equal(again, base), "without loras the adapters are off again"
    # Switched, not reloaded: the adapters stayed loaded in the model.
    assert server.app[keys.REGISTRY].default_runner._adapters == {"style", "detail"}


async def test_a_form_body_carries_model_and_loras_as_text(server: Server) -> None:
    import aiohttp

    async def form(**fields: str) -> aiohttp.ClientResponse:
        data = aiohttp.FormData(default_to_multipart=True)
        for name, value in {"prompt": "a red circle", "seed": "7", **fields}.items():
            data.add_field(name, value)
        return await server.session.post(f"{server.url}/v1/txt2img", data=data, headers=AUTH)

    as_json = await server.generate(
        "txt2img", {"prompt": "a red circle", "seed": 7, "loras": [{"name": "style", "weight": 1.0}]}
    )
    r = await form(model="sd15", loras='[{"name": "style", "weight": 1.0}]')
    assert r.status == 200, await r.text()
    assert np.array_equal(pixels(await r.json()), pixels(as_json))
    r = await form(loras='[{"name": "style", "weight": 9}]')
    assert r.status == 400
    assert (await r.json())["error"]["field"] == "loras[0].weight"
