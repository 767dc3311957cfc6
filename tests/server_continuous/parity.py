"""Continuous engine vs diffusers' own pipeline calls, image by image (used by tests and the bench).

Every request below is submitted at once, so samples of different tasks, samplers, step counts,
guidance scales, strengths and sizes share iterations; each image must still match a diffusers
pipeline call for a batch of one with the same seed and scheduler.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from inference_server.continuous.core import ContinuousEngine, ContinuousRequest

SCHEDULER_NAMES = (
    "default",
    "ddim",
    "ddpm",
    "pndm",
    "euler",
    "euler_a",
    "heun",
    "dpm++2m",
    "dpm++2m_karras",
    "unipc",
)
STOCHASTIC = ("ddpm", "euler_a")  # they draw noise from the request's generator at every step


def sample_picture(size: int, mask: bool = False) -> Any:
    """A deterministic picture (gradient and a square) or inpainting mask (white square = repaint)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    if mask:
        m = ((x > size // 4) & (x < 3 * size // 4) & (y > size // 4) & (y < 3 * size // 4)) * 255
        return Image.fromarray(m.astype(np.uint8), "L")
    rgb = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 128)], axis=-1)
    rgb[size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = (220, 30, 30)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def parity_requests(size: int) -> list[ContinuousRequest]:
    """One txt2img request per sampler, plus img2img and inpaint ones (mixed steps and guidance)."""
    image, mask = sample_picture(size), sample_picture(size, mask=True)
    reqs = []
    for k, name in enumerate(SCHEDULER_NAMES):
        reqs.append(
            ContinuousRequest(
                task="txt2img",
                prompt=f"a red square number {k}",
                negative_prompt="blurry" if k % 2 else "",
                seeds=(1000 + k, 2000 + k) if k % 4 == 0 else (1000 + k,),
                width=size,
                height=size,
                steps=4 + (k % 3) * 3,
                guidance=(7.5, 1.0, 3.0)[k % 3],  # 1.0: no classifier-free guidance rows at all
                scheduler=name,
            )
        )
    for k, (name, strength) in enumerate((("ddim", 0.6), ("euler_a", 0.75), ("heun", 0.5), ("dpm++2m", 1.0))):
        reqs.append(
            ContinuousRequest(
                task="img2img", prompt="a blue square", seeds=(3000 + k,), width=size, height=size,
                steps=8, guidance=5.0, scheduler=name, strength=strength, image=image,
            )
        )  # fmt: skip
    for k, (name, strength) in enumerate(
        (("default", 1.0), ("euler_a", 1.0), ("euler", 0.7), ("unipc", 0.8))
    ):
        reqs.append(
            ContinuousRequest(
                task="inpaint", prompt="a green circle", seeds=(4000 + k,), width=size, height=size,
                steps=7, guidance=6.0, scheduler=name, strength=strength, image=image, mask=mask,
            )
        )  # fmt: skip
    # A second size shares the iterations as a separate UNet call.
    reqs.append(
        ContinuousRequest(
            task="txt2img", prompt="a wide thing", seeds=(5000,), width=size + 16, height=size,
            steps=6, guidance=7.5, scheduler="euler",
        )
    )  # fmt: skip
    return reqs


def reference(pipes: dict[str, Any], factory: Any, req: ContinuousRequest, seed: int) -> np.ndarray:
    """diffusers' own pipeline call for a batch of one, as float HxWx3 in [0, 1]."""
    pipe = pipes[req.task]
    # The pipelines share their other modules but not this attribute; put it back afterwards so
    # that "default" keeps meaning the model's own scheduler for later engines.
    original, pipe.scheduler = pipe.scheduler, factory(req.scheduler)
    kwargs: dict[str, Any] = dict(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    if "width" in inspect.signature(pipe.__call__).parameters:
        # SD/SDXL img2img take the input image's size; the others the requested one.
        kwargs.update(width=req.width, height=req.height)
    if req.true_cfg is not None:
        kwargs.update(true_cfg_scale=req.true_cfg)  # FLUX
    if req.task != "txt2img":
        kwargs.update(image=req.image, strength=req.strength)
    if req.task == "inpaint":
        kwargs.update(mask_image=req.mask)
    try:
        with torch.inference_mode():
            return pipe(**kwargs).images[0]
    finally:
        pipe.scheduler = original


def max_differences(
    engine: ContinuousEngine, pipes: dict[str, Any], factory: Any, size: int, timeout: float = 120.0
) -> list[tuple[ContinuousRequest, float, Any]]:
    """Submit every parity request at once; per request: its largest |engine - diffusers| and result."""
    reqs = parity_requests(size)
    tickets = [engine.submit(r) for r in reqs]
    results = [t.future.result(timeout) for t in tickets]
    out = []
    for req, result in zip(reqs, results, strict=True):
        diff = max(
            float(np.abs(reference(pipes, factory, req, seed) - arr).max())
            for seed, arr in zip(req.seeds, result.arrays, strict=True)
        )
        out.append((req, diff, result))
    return out
