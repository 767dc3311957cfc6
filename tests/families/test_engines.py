"""The real server with the continuous engine configured, over every family: it runs each step by
step (txt2img, img2img, inpaint); the weights load (and warm up) once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference_server import keys
from inference_server.tiny_families import TinyFamily
from tests.families.helpers import picture
from tests.server.conftest import decode_png, make_config, running_server

CONTINUOUS = {"engine": "continuous", "max_batch_size": 4}


def pixels(image: dict[str, Any]) -> Any:
    return np.asarray(decode_png(image["png_base64"])).astype(int)


@pytest.mark.parametrize(
    ("name", "engine"),
    [
        ("sd15", "continuous"),
        ("sd2v", "continuous"),
        ("sdxl", "continuous"),
        ("sd3", "continuous"),
        ("sd3_no_t5", "continuous"),
        ("flux_dev", "continuous"),
        ("flux_schnell", "continuous"),
    ],
)
async def test_each_family_serves_with_the_continuous_engine_configured(
    name: TinyFamily, engine: str, family_path: Callable[[TinyFamily], Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inference_server")
    model = {"width": 32, "height": 32, "steps": None, "guidance": None}
    bodies: dict[str, dict[str, Any]] = {}
    for task in ("txt2img", "img2img", "inpaint"):
        fields: dict[str, Any] = {"prompt": "a fox", "seed": 1, "steps": 3, "n": 2}
        if task != "txt2img":
            fields |= {"image": picture(32, 32), "strength": 0.8}
        if task == "inpaint":
            fields["mask"] = picture(32, 32, mask=True)
        if name.startswith("flux") and task == "txt2img":
            fields |= {"negative_prompt": "blurry", "true_cfg": 2.0}  # a negative pass per image
        bodies[task] = fields
    out: dict[str, dict[str, Any]] = {}
    for configured in ("dynamic", "continuous"):
        caplog.clear()
        batching = CONTINUOUS if configured == "continuous" else {"engine": "dynamic"}
        config = make_config(family_path(name), model=model, batching=batching)
        async with running_server(config) as server:
            async with server.session.get(f"{server.url}/health") as resp:
                health = await resp.json()
            for task, fields in bodies.items():
                out[f"{configured}/{task}"] = await server.generate(task, fields)
            runner = server.app[keys.ENGINE].runner
    assert health["engine"] == engine
    assert health["capabilities"]["family"] == runner.family.name
    loads = [r for r in caplog.records if r.getMessage().startswith("loaded ")]
    warmups = [r for r in caplog.records if r.getMessage().startswith("warm-up generation took")]
    assert len(loads) == 1 and len(warmups) == 1, [r.getMessage() for r in loads + warmups]
    for task in bodies:
        step_level, request_level = out[f"continuous/{task}"]["images"], out[f"dynamic/{task}"]["images"]
        assert [decode_png(i["png_base64"]).size for i in step_level] == [(32, 32)] * 2
        for a, b in zip(step_level, request_level, strict=True):
            # The same images as the request-level engine's pipeline call; PNG is 8-bit, so float
            # differences of ~1e-6 may flip one rounding, never more than one level.
            diff = np.abs(pixels(a) - pixels(b)).max()
            assert diff <= 1, (task, diff)
