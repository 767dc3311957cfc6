"""`[model]` for real checkpoints: checked at start-up (or once the model is loaded, against its
family), each error naming the key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from inference_server.config import ModelConfig, load_config
from inference_server.config_loader import ConfigError
from inference_server.pipelines import ModelLoadError, PipelineRunner, choose_device, choose_dtype
from inference_server.tiny_families import TinyFamily


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({"device": "gpu"}, "[model] device"),
        ({"device": "cuda:x"}, "[model] device"),
        ({"offload": "model", "device": "cpu"}, "[model] offload"),
        ({"offload": "everything"}, "[model] offload"),
        ({"width": 100}, "[model] width"),
        ({"drop_t5": "maybe"}, "[model] drop_t5"),
    ],
)
def test_bad_model_keys_are_refused_at_start_up(model: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config({"model": model}, environ={})
    assert needle in str(e.value)


def test_one_server_per_gpu_is_one_line() -> None:
    assert load_config({"model": {"device": "cuda:3"}}, environ={}).model.device == "cuda:3"
    assert load_config({}, environ={"IMAGINE_MODEL_DEVICE": "cuda:1"}).model.device == "cuda:1"


def test_a_gpu_that_is_not_there_names_the_key() -> None:
    import torch

    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"\[model\] device"):
            choose_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(
            ConfigError, match=r"\[model\] device: \"cuda:0\" requested but torch sees no CUDA"
        ):
            choose_device("cuda:0")


def test_dtype_per_family() -> None:
    assert choose_dtype("auto", "cuda", "FluxPipeline") == "bfloat16"
    assert choose_dtype("auto", "cuda:1", "StableDiffusionXLPipeline") == "float16"
    assert choose_dtype("auto", "cpu", "FluxPipeline") == "float32"
    assert choose_dtype("float32", "cuda", "FluxPipeline") == "float32"


@pytest.mark.parametrize(
    ("name", "model", "needle"),
    [
        ("flux_dev", {"width": 72}, "[model] width: 72 is not a multiple of 16, which FLUX.1-dev needs"),
        ("sd3", {"scheduler": "euler"}, "[model] scheduler: 'euler' is not a sampler for Stable Diffusion 3"),
        ("flux_schnell", {"guidance": 3.5}, "[model] guidance: FLUX.1-schnell takes no guidance"),
        ("sdxl", {"scheduler": "flow_euler"}, "[model] scheduler"),
        ("flux_dev", {"drop_t5": True}, "[model] drop_t5: only SD 3.x"),
    ],
)
async def test_keys_the_loaded_model_cant_honour_fail_the_load(
    name: TinyFamily, model: dict[str, Any], needle: str, family_path: Callable[[TinyFamily], Path]
) -> None:
    runner = PipelineRunner(ModelConfig(path=str(family_path(name)), warmup=False, cpu_threads=1, **model))
    try:
        with pytest.raises(ConfigError) as e:
            await runner.load()
        assert needle in str(e.value)
    finally:
        runner.close()


async def test_a_model_of_no_family_is_refused_naming_it(tmp_path: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from inference_server.tiny_families import build_tiny_family

    pipe = build_tiny_family("sd15")
    config = dict(pipe.unet.config)
    config["in_channels"] = 5  # a depth-to-image UNet: neither text-to-image nor inpainting
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config(config)
    pipe.save_pretrained(tmp_path / "depth")
    runner = PipelineRunner(ModelConfig(path=str(tmp_path / "depth"), warmup=False))
    try:
        with pytest.raises(ModelLoadError) as e:
            await runner.load()
        assert "not a model family this server serves" in str(e.value) and "[model] path" in str(e.value)
    finally:
        runner.close()
