"""Live previews: streamed `preview` events from both engines, for the embedded model and tiny families."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from inference_server.config import BatchingConfig, Config, ModelConfig, ServerConfig
from inference_server.previews import PREVIEW_MAX_SIDE, Previewer, previewer_for
from inference_server.tiny_families import save_tiny_family
from tests.server.conftest import AUTH, decode_png, make_config, running_server

ENGINES = ("dynamic", "continuous")


async def stream(config: Config, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with running_server(config) as server:
        async with server.session.post(
            f"{server.url}/v1/txt2img", json={**body, "stream": True}, headers=AUTH
        ) as resp:
            assert resp.status == 200
            return [json.loads(line) async for line in resp.content if line.strip()]


def check_previews(events: list[dict[str, Any]], *, n: int, steps: list[int], total: int) -> None:
    previews = [e for e in events if e["event"] == "preview"]
    assert sorted((e["step"], e["index"]) for e in previews) == [(s, i) for s in steps for i in range(n)]
    # The image's own size, capped at PREVIEW_MAX_SIDE (a preview is never larger than its image).
    result = decode_png(events[-1]["images"][0]["png_base64"])
    side = min(PREVIEW_MAX_SIDE, max(result.size))
    for e in previews:
        assert e["total"] == total
        image = Image.open(io.BytesIO(base64.b64decode(e["png_base64"])))
        assert image.format == "PNG" and max(image.size) == side
    # Each preview comes after the progress event of its step, and all before the one result.
    kinds = [e["event"] for e in events]
    assert kinds.count("result") == 1 and kinds[-1] == "result"
    for e in previews:
        at = events.index(e)
        assert any(p["event"] == "progress" and p["step"] == e["step"] for p in events[:at])
    assert len(events[-1]["images"]) == n


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference_server.testing import TinyPipelineSpec, save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-previews") / "pipe", TinyPipelineSpec())


@pytest.mark.parametrize("engine", ENGINES)
async def test_previews_every_n_steps_for_each_image(sd_model: Path, engine: str) -> None:
    config = make_config(
        sd_model,
        server={"preview_every_steps": 2},
        batching={"engine": engine},
    )
    events = await stream(config, {"prompt": "a star", "seed": 3, "n": 2, "steps": 7})
    check_previews(events, n=2, steps=[2, 4, 6], total=7)


@pytest.mark.parametrize("engine", ENGINES)
async def test_embedded_model_previews(engine: str) -> None:
    config = Config(
        server=ServerConfig(port=0, progress_interval_s=0.0, preview_every_steps=2),
        model=ModelConfig(path="embedded", cpu_threads=1),
        batching=BatchingConfig(engine=engine),
    )
    events = await stream(config, {"prompt": "a red circle", "seed": 1, "steps": 4})
    check_previews(events, n=1, steps=[2], total=4)


@pytest.mark.parametrize("engine", ENGINES)
async def test_flux_previews_unpack_its_latents(tmp_path: Path, engine: str) -> None:
    path = save_tiny_family("flux_schnell", tmp_path / "flux")
    config = Config(
        server=ServerConfig(port=0, progress_interval_s=0.0, preview_every_steps=1),
        model=ModelConfig(path=str(path), width=64, height=32, cpu_threads=1),
        batching=BatchingConfig(engine=engine),
    )
    events = await stream(config, {"prompt": "a cat", "seed": 2, "steps": 3})
    check_previews(events, n=1, steps=[1, 2], total=3)
    # The preview keeps the image's shape (2:1) after unpacking FLUX's 2x2 tokens.
    preview = next(e for e in events if e["event"] == "preview")
    assert decode_png(preview["png_base64"]).size == (64, 32)


@pytest.mark.parametrize("engine", ENGINES)
async def test_previews_off_sends_none(sd_model: Path, engine: str) -> None:
    config = make_config(sd_model, server={"preview_every_steps": 0}, batching={"engine": engine})
    events = await stream(config, {"prompt": "a star", "seed": 3, "steps": 4})
    assert [e for e in events if e["event"] == "preview"] == []
    assert events[-1]["event"] == "result"


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_failing_preview_never_fails_the_request(
    sd_model: Path, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Previewer, latents: Any) -> list[bytes]:
        raise RuntimeError("preview bug")

    monkeypatch.setattr(Previewer, "pngs", broken)
    config = make_config(sd_model, server={"preview_every_steps": 1}, batching={"engine": engine})
    events = await stream(config, {"prompt": "a star", "seed": 3, "steps": 3})
    assert [e for e in events if e["event"] == "preview"] == []
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    assert events[-1]["event"] == "result" and len(events[-1]["images"]) == 1


def test_published_factors_for_published_vaes_and_a_fitted_projection_otherwise() -> None:
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        scaling_factor=0.13025,
    )
    assert previewer_for(vae).source == "published"  # SDXL's VAE
    assert previewer_for(vae).latent_scale == 1  # one block: no downsampling
    vae.register_to_config(scaling_factor=0.5)
    fitted = previewer_for(vae)
    assert fitted.source == "fitted" and fitted.weight.shape == (4, 3)
    # The fitted map predicts the mean colour of what a latent decodes to better than a constant.
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1)) / 0.5
    with torch.no_grad():
        decoded = torch.nn.functional.adaptive_avg_pool2d(vae.decode(latents).sample, (8, 8))
    predicted = torch.einsum("bchw,cr->brhw", latents, fitted.weight) + fitted.bias[:, None, None]
    assert ((predicted - decoded) ** 2).mean() < ((decoded - decoded.mean()) ** 2).mean()


def test_a_preview_is_its_image_size_capped_at_the_maximum() -> None:
    import torch

    previewer = Previewer(weight=torch.zeros((4, 3)), bias=torch.zeros(3), source="fitted", latent_scale=8)
    small, large, wide = (
        Image.open(io.BytesIO(previewer.pngs(torch.zeros(shape))[0])).size
        for shape in ((1, 4, 4, 4), (1, 4, 64, 64), (1, 4, 8, 128))
    )
    assert small == (32, 32)  # a 32 px image: never scaled past itself
    assert large == (PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE)
    assert wide == (PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE // 16)
