"""The continuous engine over every family: the UNet families it runs step by step; the others it
hands to the request-level engine over the same runner, so the weights load (and warm up) once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from inference_server import keys
from inference_server.tiny_families import TinyFamily
from tests.families.helpers import picture
from tests.server.conftest import decode_png, make_config, running_server

CONTINUOUS = {"engine": "continuous", "max_batch_size": 4}


@pytest.mark.parametrize(
    ("name", "engine"),
    [
        ("sd15", "continuous"),
        ("sd2v", "continuous"),
        ("sdxl", "dynamic"),
        ("sd3_no_t5", "dynamic"),
        ("flux_dev", "dynamic"),
    ],
)
async def test_each_family_serves_with_the_continuous_engine_configured(
    name: TinyFamily, engine: str, family_path: Callable[[TinyFamily], Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inference_server")
    model = {"width": 32, "height": 32, "steps": None, "guidance": None}
    config = make_config(family_path(name), model=model, batching=CONTINUOUS)
    async with running_server(config) as server:
        async with server.session.get(f"{server.url}/health") as resp:
            health = await resp.json()
        for task in ("txt2img", "img2img", "inpaint"):
            fields = {"prompt": "a fox", "seed": 1, "steps": 2, "n": 2}
            if task != "txt2img":
                fields |= {"image": picture(32, 32), "strength": 1.0}
            if task == "inpaint":
                fields["mask"] = picture(32, 32, mask=True)
            result = await server.generate(task, fields)
            assert [decode_png(i["png_base64"]).size for i in result["images"]] == [(32, 32)] * 2
        runner = server.app[keys.ENGINE].runner
    assert health["engine"] == engine
    assert health["capabilities"]["family"] == runner.family.name
    loads = [r for r in caplog.records if r.getMessage().startswith("loaded ")]
    warmups = [r for r in caplog.records if r.getMessage().startswith("warm-up generation took")]
    assert len(loads) == 1 and len(warmups) == 1, [r.getMessage() for r in loads + warmups]
