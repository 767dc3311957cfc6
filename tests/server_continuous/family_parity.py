"""Parity requests and pipelines for the families beyond SD 1.x/2.x (SDXL, SD 3.x, FLUX.1).

SDXL takes every DDPM-family sampler, so it gets the SD parity requests (`parity_requests`);
the flow-matching families get every flow sampler for each task, with and without guidance rows
(SD3's classifier-free guidance, FLUX's true CFG), dev's embedded guidance at several values, and
a second size, all submitted at once so that they share iterations.
"""

from __future__ import annotations

from typing import Any

from inference_server.continuous.core import ContinuousRequest
from inference_server.families import FLOW_SAMPLERS
from inference_server.tiny_families import TinyFamily
from tests.server_continuous.parity import parity_requests, sample_picture

# Flow-matching families need sizes that are multiples of 16; 32 -> 4x4 latents (2x2 tokens).
FAMILY_SIZE = 32
FAMILIES: tuple[TinyFamily, ...] = ("sdxl", "sd3", "sd3_no_t5", "flux_dev", "flux_schnell")


def family_pipes(name: TinyFamily) -> dict[str, Any]:
    """The tiny pipeline of `name` for each task, sharing modules (as the server builds them)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    from inference_server.tiny_families import build_tiny_family

    base = build_tiny_family(name)
    pipes = {
        "txt2img": base,
        "img2img": AutoPipelineForImage2Image.from_pipe(base),
        "inpaint": AutoPipelineForInpainting.from_pipe(base),
    }
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


def family_requests(name: TinyFamily, size: int = FAMILY_SIZE) -> list[ContinuousRequest]:
    if name == "sdxl":
        return parity_requests(size)
    image, mask = sample_picture(size), sample_picture(size, mask=True)
    flux = name.startswith("flux")
    # SD3: classifier-free guidance (1.0: no unconditional rows). FLUX dev: the embedded guidance;
    # schnell: none. FLUX's negative prompt acts through true CFG only.
    guidances = {"flux_dev": (3.5, 1.0, 6.0), "flux_schnell": (0.0, 0.0, 0.0)}.get(name, (7.0, 1.0, 3.0))
    reqs = []
    k = 0
    for task in ("txt2img", "img2img", "inpaint"):
        for sampler in FLOW_SAMPLERS:
            for variant in range(2):
                k += 1
                negative = "blurry" if variant else None
                reqs.append(
                    ContinuousRequest(
                        task=task,
                        prompt=f"a red square number {k}",
                        negative_prompt=negative,
                        true_cfg=4.0 if flux and negative else None,
                        seeds=(100 + k, 200 + k) if k % 4 == 1 else (100 + k,),
                        width=size,
                        height=size,
                        steps=3 + k % 4,
                        guidance=guidances[k % 3],
                        scheduler=sampler,
                        strength=1.0 if task == "txt2img" else (0.7, 1.0, 0.55)[k % 3],
                        image=None if task == "txt2img" else image,
                        mask=mask if task == "inpaint" else None,
                    )
                )
    # A second size shares the iterations as a separate denoiser call (and, for FLUX, image ids).
    reqs.append(
        ContinuousRequest(
            task="txt2img", prompt="a wide thing", seeds=(500,), width=size + 16, height=size,
            steps=4, guidance=guidances[0], scheduler="default",
        )
    )  # fmt: skip
    return reqs
