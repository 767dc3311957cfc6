"""The tiny pipelines of every family: each is detected as its family, and loads and runs every task
through the server's own loader (`PipelineRunner`), at sizes in its multiple."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from inference_server.config import ModelConfig
from inference_server.engine import TASKS, GenerationRequest
from inference_server.families import DDPM_SAMPLERS, FLOW_SAMPLERS, detect_family
from inference_server.pipelines import PipelineRunner
from inference_server.tiny_families import TINY_FAMILIES, TinyFamily, build_tiny_family

# name -> (family, size multiple, native side, pipeline class)
EXPECTED: dict[TinyFamily, tuple[str, int, int, str]] = {
    "sd15": ("sd", 8, 64, "StableDiffusionPipeline"),
    "sd2v": ("sd-v", 8, 96, "StableDiffusionPipeline"),
    "sdxl": ("sdxl", 8, 128, "StableDiffusionXLPipeline"),
    "sd3": ("sd3", 16, 128, "StableDiffusion3Pipeline"),
    "sd3_no_t5": ("sd3", 16, 128, "StableDiffusion3Pipeline"),
    "flux_dev": ("flux-dev", 16, 1024, "FluxPipeline"),
    "flux_schnell": ("flux-schnell", 16, 1024, "FluxPipeline"),
}


def test_every_tiny_family_is_listed() -> None:
    assert set(EXPECTED) == set(TINY_FAMILIES)


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_detected_family(name: TinyFamily) -> None:
    family, multiple, native, pipeline = EXPECTED[name]
    detected = detect_family(build_tiny_family(name))
    assert (detected.name, detected.size_multiple, detected.native_width, detected.pipeline) == (
        family,
        multiple,
        native,
        pipeline,
    )
    assert detected.native_height == native
    # Flow-matching models are offered flow samplers only; UNet models the DDPM family.
    assert detected.samplers == tuple(FLOW_SAMPLERS if detected.flow_matching else DDPM_SAMPLERS)
    assert detected.flow_matching == (family in ("sd3", "flux-dev", "flux-schnell"))


def test_family_semantics() -> None:
    dev = detect_family(build_tiny_family("flux_dev"))
    schnell = detect_family(build_tiny_family("flux_schnell"))
    sd3 = detect_family(build_tiny_family("sd3"))
    assert (dev.guidance, dev.default_guidance, dev.negative_prompt) == ("distilled", 3.5, "true_cfg")
    assert (schnell.guidance, schnell.default_guidance, schnell.default_steps) == ("none", 0.0, 4)
    assert (sd3.guidance, sd3.negative_prompt) == ("cfg", "cfg")
    assert detect_family(build_tiny_family("sd2v")).prediction == "v_prediction"


@pytest.mark.parametrize("name", TINY_FAMILIES)
async def test_loads_and_runs_every_task(name: TinyFamily, family_path: Callable[[TinyFamily], Path]) -> None:
    family, multiple, _, _ = EXPECTED[name]
    # Two multiples wide, one high: the output must have exactly the requested size.
    width, height = 2 * multiple, multiple
    runner = PipelineRunner(
        ModelConfig(path=str(family_path(name)), width=width, height=height, cpu_threads=1)
    )
    try:
        await runner.load()
        assert runner.family is not None and runner.family.name == family
        assert runner.family.tasks == TASKS
        image = Image.new("RGB", (width, height), (200, 40, 40))
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (0, 0, width // 2, height))
        batch = [
            GenerationRequest(
                task=task,
                prompt="a red fox",
                negative_prompt="",
                seeds=(1, 2),
                width=width,
                height=height,
                steps=2,
                guidance=runner.family.default_guidance,
                strength=None if task == "txt2img" else 1.0,
                image=None if task == "txt2img" else image,
                mask=mask if task == "inpaint" else None,
            )
            for task in TASKS
        ]
        for request in batch:
            report = await runner.run([request], None, lambda: False)
            [outcome] = report.outcomes
            assert outcome.error is None, outcome.error
            assert outcome.images is not None and [im.size for im in outcome.images] == [(width, height)] * 2
    finally:
        runner.close()


async def test_sd3_without_t5_loads_as_saved(family_path: Callable[[TinyFamily], Path]) -> None:
    """A pipeline folder saved without T5 (model_index: text_encoder_3 = [null, null]) loads as it is."""
    runner = PipelineRunner(ModelConfig(path=str(family_path("sd3_no_t5")), warmup=True, cpu_threads=1))
    try:
        await runner.load()
        assert runner.pipeline("txt2img").text_encoder_3 is None
    finally:
        runner.close()


async def test_drop_t5_loads_sd3_without_it(family_path: Callable[[TinyFamily], Path]) -> None:
    runner = PipelineRunner(ModelConfig(path=str(family_path("sd3")), drop_t5=True, cpu_threads=1))
    try:
        await runner.load()
        pipe = runner.pipeline("txt2img")
        assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
        assert runner.pipeline("inpaint").text_encoder_3 is None
    finally:
        runner.close()
