"""The shipped weights load offline as a stock StableDiffusionPipeline and serve all three tasks."""

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from .conftest import WEIGHTS

# The weights live in git: every clone carries them, so they stay this small.
MAX_WEIGHTS_MB = 25


def test_folder_holds_standard_classes_in_safetensors(shipped_pipeline):
    pipe = shipped_pipeline
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    files = [p for p in WEIGHTS.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    assert len([p for p in files if p.suffix == ".safetensors"]) == 3
    assert sum(p.stat().st_size for p in files) <= MAX_WEIGHTS_MB * 1_000_000


def test_text_to_image_is_seeded_and_64px(shipped_pipeline):
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, height=64, width=64)
    a = shipped_pipeline(
        "a red circle on a blue background", generator=torch.Generator().manual_seed(3), **kwargs
    ).images[0]
    b = shipped_pipeline(
        "a red circle on a blue background", generator=torch.Generator().manual_seed(3), **kwargs
    ).images[0]
    c = shipped_pipeline(
        "a red circle on a blue background", generator=torch.Generator().manual_seed(4), **kwargs
    ).images[0]
    assert a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert np.asarray(a).std() > 5  # an image, not a flat field


def test_image_to_image_and_inpaint_share_the_modules(shipped_pipeline):
    source = shipped_pipeline(
        "a white square on a black background",
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(1),
    ).images[0]
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(shipped_pipeline)
    assert img2img.unet is shipped_pipeline.unet
    var = img2img(
        "a white square on a black background",
        image=source,
        strength=0.5,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(2),
    ).images[0]
    assert var.size == (64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    inpaint = StableDiffusionInpaintPipeline.from_pipe(shipped_pipeline)
    out = inpaint(
        "a yellow circle on a green background",
        image=source,
        mask_image=mask,
        height=64,
        width=64,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(2),
    ).images[0]
    pasted = inpaint.image_processor.apply_overlay(mask, source, out)
    src, res = np.asarray(source, np.float32), np.asarray(pasted, np.float32)
    inside = np.asarray(mask) > 127
    assert np.abs(res - src)[~inside].mean() < 1.0
    assert np.abs(res - src)[inside].mean() > 10.0
