"""Single-file checkpoints: a tiny SD 1.5 written by the test in the original layout loads through
`from_single_file` offline (configs from a local folder) and makes the same images as the folder
it came from; a file whose family can't be told, and a .ckpt without the opt-in, are refused naming
the file and what to set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference_server.config import ModelConfig, RegistryConfig
from inference_server.pipelines import ModelLoadError, PipelineRunner
from tests.models.conftest import registry_config, tiny_model
from tests.models.ldm import round_trip_problems, write_ldm_checkpoint
from tests.server.conftest import decode_png, running_server


@pytest.fixture(scope="session")
def sd15_file(sd15_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(str(sd15_path))
    path = write_ldm_checkpoint(pipe, tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors")
    assert round_trip_problems(pipe, load_file(str(path))) == []
    return path


async def test_a_single_file_serves_the_same_images_as_its_folder(
    sd15_path: Path, sdxl_path: Path, sd15_file: Path
) -> None:
    config = registry_config(
        sd15_path,
        sdxl_path,
        models={
            "folder": tiny_model(sd15_path, default=True),
            # No family given: read from the file's keys ("v1" to diffusers: SD 1.x).
            "file": tiny_model(sd15_file, config=str(sd15_path)),
        },
    )
    async with running_server(config) as server:
        images = {}
        for name in ("folder", "file"):
            result = await server.generate("txt2img", {"prompt": "a blue square", "seed": 5, "model": name})
            assert result["model"] == name
            images[name] = np.asarray(decode_png(result["images"][0]["png_base64"]))
        async with server.session.get(
            f"{server.url}/v1/models/file", headers={"Authorization": "Bearer test-token"}
        ) as r:
            entry = await r.json()
    assert entry["family"] == "sd" and entry["loaded"] is True
    assert np.array_equal(images["folder"], images["file"])


async def load(config: ModelConfig, **runner: Any) -> PipelineRunner:
    r = PipelineRunner(config, **runner)
    try:
        await r.load()
    finally:
        r.close()
    return r


async def test_a_file_of_no_known_family_is_refused_naming_it(tmp_path: Path, sd15_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    odd = tmp_path / "mystery.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, str(odd))
    with pytest.raises(ModelLoadError) as e:
        await load(tiny_model(odd, config=str(sd15_path)), section="models.mystery")
    assert str(odd) in str(e.value) and "set family" in str(e.value)


async def test_a_single_file_needs_a_local_config_folder(sd15_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as e:
        await load(tiny_model(sd15_file), section="models.x")
    assert "[models.x] config" in str(e.value) and "never downloads" in str(e.value)
    with pytest.raises(ModelLoadError) as e:
        await load(tiny_model(sd15_file, config=str(tmp_path)), section="models.x")
    assert "no model_index.json" in str(e.value)


async def test_ckpt_needs_the_opt_in(sd15_path: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"not even a pickle")
    with pytest.raises(ModelLoadError) as e:
        await load(tiny_model(ckpt, config=str(sd15_path)), section="models.old")
    assert "allow_ckpt" in str(e.value) and str(ckpt) in str(e.value)
    assert RegistryConfig().allow_ckpt is False
