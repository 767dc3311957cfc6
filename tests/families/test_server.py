"""Every family x task through the real server (request-level engine): sizes and counts, defaults
from the family, batching, and what each family refuses (a 400 naming the field, never a 500 and
never a silent change). One server per family, shared by this module's tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from inference_server.tiny_families import TINY_FAMILIES, TinyFamily
from tests.families.helpers import DenoiserGate, picture, wait_queued
from tests.server.conftest import AUTH, Server, decode_png, make_config, metric, running_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

FLOW = {"sd3", "sd3_no_t5", "flux_dev", "flux_schnell"}
FLUX = {"flux_dev", "flux_schnell"}
MULTIPLE = {name: 16 if name in FLOW else 8 for name in TINY_FAMILIES}
# FLUX's native size is 1024 (a constant of its pipeline): its servers set a small default instead.
DEFAULT_SIDE = {
    "sd15": 64,
    "sd2v": 96,
    "sdxl": 128,
    "sd3": 128,
    "sd3_no_t5": 128,
    "flux_dev": 64,
    "flux_schnell": 64,
}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=TINY_FAMILIES)
async def family(
    request: pytest.FixtureRequest, family_path: Callable[[TinyFamily], Path]
) -> AsyncIterator[Any]:
    name: TinyFamily = request.param
    model: dict[str, Any] = {"width": None, "height": None, "steps": None, "guidance": None}
    if name in FLUX:
        model |= {"width": 64, "height": 64}
    config = make_config(family_path(name), model=model, batching={"max_wait_ms": 0.0})
    async with running_server(config) as server:
        yield name, server


def body(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a red fox in the snow", "seed": 3, "steps": 2, **fields}


async def refused(server: Server, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    async with server.session.post(f"{server.url}{path}", json=payload, headers=AUTH) as resp:
        answer = await resp.json()
        assert resp.status == 400, answer
        return answer["error"]


async def test_health_and_models_report_the_family(family: Any) -> None:
    name, server = family
    async with server.session.get(f"{server.url}/health") as resp:
        caps = (await resp.json())["capabilities"]
    async with server.session.get(f"{server.url}/v1/models", headers=AUTH) as resp:
        [model] = (await resp.json())["data"]
    assert model["capabilities"] == caps
    assert caps["size_multiple"] == MULTIPLE[name]
    assert (caps["default_width"], caps["default_height"]) == (DEFAULT_SIDE[name],) * 2
    assert caps["tasks"] == ["txt2img", "img2img", "inpaint"]
    assert caps["flow_matching"] == (name in FLOW)
    assert caps["samplers"] == (["default", "flow_euler"] if name in FLOW else caps["samplers"])
    assert "euler" in caps["samplers"] or name in FLOW
    assert caps["negative_prompt"] == ("true_cfg" if name in FLUX else "cfg")
    expected_guidance = {"flux_dev": 3.5, "flux_schnell": 0.0, "sdxl": 5.0, "sd3": 7.0, "sd3_no_t5": 7.0}
    assert caps["default_guidance"] == expected_guidance.get(name, 7.5)
    assert caps["max_side"] % MULTIPLE[name] == 0


@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint"])
async def test_every_task_makes_the_requested_size_and_count(family: Any, task: str) -> None:
    name, server = family
    m = MULTIPLE[name]
    width, height = 3 * m, 2 * m
    fields: dict[str, Any] = {"n": 2, "width": width, "height": height}
    if task != "txt2img":
        # An input of another size is resized to the requested one (FLUX img2img used to answer
        # at 1024x1024 whatever was asked).
        fields |= {"image": picture(4 * m, 4 * m), "strength": 1.0}
    if task == "inpaint":
        fields["mask"] = picture(4 * m, 4 * m, mask=True)
    result = await server.generate(task, body(**fields))
    assert (result["width"], result["height"]) == (width, height)
    assert [decode_png(i["png_base64"]).size for i in result["images"]] == [(width, height)] * 2
    assert [i["seed"] for i in result["images"]] == [3, 4]


async def test_img2img_without_a_size_keeps_the_input_size(family: Any) -> None:
    name, server = family
    side = 2 * MULTIPLE[name]
    result = await server.generate("img2img", body(image=picture(side, side), strength=0.5))
    assert (result["width"], result["height"]) == (side, side)
    assert decode_png(result["images"][0]["png_base64"]).size == (side, side)


async def test_defaults_come_from_the_family(family: Any) -> None:
    name, server = family
    result = await server.generate("txt2img", {"prompt": "defaults", "seed": 1})
    side = DEFAULT_SIDE[name]
    assert (result["width"], result["height"]) == (side, side)
    assert result["steps"] == {"sdxl": 30, "flux_dev": 28, "flux_schnell": 4, "sd3": 28, "sd3_no_t5": 28}.get(
        name, 20
    )


async def test_concurrent_requests_share_one_call(family: Any) -> None:
    name, server = family
    before = metric(await server.metrics(), "inference_pipeline_calls_total")
    gate = DenoiserGate(server)
    try:
        first = asyncio.ensure_future(server.generate("txt2img", body(prompt="first")))
        assert await asyncio.to_thread(gate.entered.wait, 30), "the pipeline never started"
        # Three requests queue behind the busy device with one batch key: one call runs them all.
        queued = [asyncio.ensure_future(server.generate("txt2img", body(seed=10 + i))) for i in range(3)]
        await wait_queued(server, 3)
    finally:
        gate.open()
    results = await asyncio.gather(*queued)
    await first
    after = metric(await server.metrics(), "inference_pipeline_calls_total")
    assert [r["batch_size"] for r in results] == [3, 3, 3]
    assert after - before == 2  # the first request's call, then one for the three


async def test_an_image_is_the_same_alone_or_batched(family: Any) -> None:
    name, server = family
    target = body(prompt="target", seed=77)
    alone = await server.generate("txt2img", target)
    gate = DenoiserGate(server)
    try:
        first = asyncio.ensure_future(server.generate("txt2img", body(prompt="first")))
        assert await asyncio.to_thread(gate.entered.wait, 30)
        jobs = [asyncio.ensure_future(server.generate("txt2img", b)) for b in (body(seed=1), target)]
        await wait_queued(server, 2)
    finally:
        gate.open()
    _, batched = await asyncio.gather(*jobs)
    await first
    assert batched["batch_size"] == 2
    a = np.asarray(decode_png(alone["images"][0]["png_base64"])).astype(int)
    b = np.asarray(decode_png(batched["images"][0]["png_base64"])).astype(int)
    assert np.abs(a - b).max() <= 1  # 8-bit PNG: a float difference of ~1e-6 may flip a rounding


# -- what each family refuses ----------------------------------------------------------------------


async def test_a_size_off_the_multiple_is_a_400_naming_it(family: Any) -> None:
    name, server = family
    m = MULTIPLE[name]
    bad = m * 3 + 8 if m == 16 else m * 3 + 4
    error = await refused(server, "/v1/txt2img", body(width=bad))
    assert error["field"] == "width" and f"multiple of {m}" in error["message"], error
    error = await refused(server, "/v1/images/generations", {"prompt": "x", "size": f"{bad}x{2 * m}"})
    assert error["param"] == "size" and f"multiples of {m}" in error["message"], error
    # An uploaded image sets the size when none is given: it must fit the multiple too.
    error = await refused(server, "/v1/img2img", body(image=picture(bad, 2 * m)))
    assert error["field"] == "image" and f"multiple of {m}" in error["message"], error


async def test_samplers_of_the_other_kind_are_refused(family: Any) -> None:
    name, server = family
    if name in FLOW:
        for sampler in ("euler", "ddim"):
            error = await refused(server, "/v1/txt2img", body(scheduler=sampler))
            assert error["field"] == "scheduler", error
            assert "default, flow_euler" in error["message"] and "flow-matching" in error["message"], error
        result = await server.generate("txt2img", body(scheduler="flow_euler"))
    else:
        error = await refused(server, "/v1/txt2img", body(scheduler="flow_euler"))
        assert error["field"] == "scheduler" and "euler_a" in error["message"], error
        result = await server.generate("txt2img", body(scheduler="euler"))
    assert len(result["images"]) == 1


async def test_negative_prompt_and_guidance_follow_the_family(family: Any) -> None:
    name, server = family
    if name in FLUX:
        # FLUX honours a negative prompt through true CFG (default scale, or the request's).
        plain = await server.generate("txt2img", body())
        negative = await server.generate("txt2img", body(negative_prompt="blurry"))
        scaled = await server.generate("txt2img", body(negative_prompt="blurry", true_cfg=2.0))
        images = [
            np.asarray(decode_png(r["images"][0]["png_base64"])).astype(int)
            for r in (plain, negative, scaled)
        ]
        assert np.abs(images[0] - images[1]).max() > 0 and np.abs(images[1] - images[2]).max() > 0
        error = await refused(server, "/v1/txt2img", body(true_cfg=0.5))
        assert error["field"] == "true_cfg", error
    else:
        error = await refused(server, "/v1/txt2img", body(true_cfg=4.0))
        assert error["field"] == "true_cfg" and "FLUX" in error["message"], error
        # A negative prompt acts only through classifier-free guidance, which needs guidance > 1.
        error = await refused(server, "/v1/txt2img", body(negative_prompt="blurry", guidance=1.0))
        assert error["field"] == "negative_prompt" and "guidance > 1" in error["message"], error
        await server.generate("txt2img", body(negative_prompt="blurry", guidance=5.0))
    if name == "flux_schnell":
        error = await refused(server, "/v1/txt2img", body(guidance=3.5))
        assert error["field"] == "guidance" and "no guidance" in error["message"], error
        assert (await server.generate("txt2img", body(guidance=0)))["images"]
    else:
        assert (await server.generate("txt2img", body(guidance=4.0)))["images"]


async def test_negative_prompts_batch_as_the_family_runs_them(family: Any) -> None:
    """True CFG's scale is one value per pipeline call: FLUX requests with and without a negative
    prompt never share one (the batch key holds it). With classifier-free guidance a negative prompt
    is just another input, so the other families batch them together."""
    name, server = family
    gate = DenoiserGate(server)
    try:
        first = asyncio.ensure_future(server.generate("txt2img", body(prompt="first")))
        assert await asyncio.to_thread(gate.entered.wait, 30)
        bodies = [
            body(seed=1),
            body(seed=2, negative_prompt="blurry"),
            body(seed=3),
            body(seed=4, negative_prompt="x"),
        ]
        jobs = [asyncio.ensure_future(server.generate("txt2img", b)) for b in bodies]
        await wait_queued(server, 4)
    finally:
        gate.open()
    results = await asyncio.gather(*jobs)
    await first
    assert [r["batch_size"] for r in results] == ([2, 2, 2, 2] if name in FLUX else [4, 4, 4, 4])


async def test_the_openapi_document_follows_the_family(family: Any) -> None:
    import yaml
    from openapi_spec_validator import validate as validate_openapi

    name, server = family
    async with server.session.get(f"{server.url}/openapi.yaml") as resp:
        doc = yaml.safe_load(await resp.text())
    async with server.session.get(f"{server.url}/health") as resp:
        caps = (await resp.json())["capabilities"]
    validate_openapi(doc)
    schemas = doc["components"]["schemas"]
    assert set(caps) == set(schemas["Capabilities"]["properties"])
    fields = schemas["Txt2ImgRequest"]["properties"]
    [width] = [option for option in fields["width"]["anyOf"] if option.get("type") == "integer"]
    assert width["multipleOf"] == MULTIPLE[name]
    [scheduler] = [option for option in fields["scheduler"]["anyOf"] if option.get("type") == "string"]
    assert scheduler["enum"] == caps["samplers"]
    assert ("true_cfg" in fields) == (name in FLUX)
