"""Which denoiser adapter runs a loaded pipeline, and why a model gets none.

The continuous engine runs a model when its denoiser takes the plain latent as input, for every
family the server serves: SD 1.x/2.x and SDXL UNets, SD 3.x and FLUX.1 transformers. Inpainting
checkpoints whose denoiser also takes the mask and the masked image (9-channel UNets, 33-channel
SD3, FLUX Fill) step differently and stay on the request-level engine (`unsupported_reason`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing this module stays cheap: no torch
    from inference_server.continuous.denoiser import Denoiser


def _denoiser(pipe: Any) -> tuple[Any, str]:
    for attr in ("unet", "transformer"):
        model = getattr(pipe, attr, None)
        if model is not None:
            return model, type(model).__name__
    return None, "no denoiser"


def unsupported_reason(pipe: Any) -> str | None:
    """Why the continuous engine can't run `pipe`, or None when it can."""
    model, kind = _denoiser(pipe)
    latent = int(pipe.vae.config.latent_channels) if getattr(pipe, "vae", None) is not None else 0
    if kind == "UNet2DConditionModel":
        if model.config.in_channels != latent:
            return f"UNet takes {model.config.in_channels} input channels (inpainting checkpoint)"
        return None
    if kind == "SD3Transformer2DModel":
        if model.config.in_channels != latent:
            return f"SD3 transformer takes {model.config.in_channels} input channels (inpainting checkpoint)"
        return None
    if kind == "FluxTransformer2DModel":
        if model.config.in_channels != 4 * latent:
            # FLUX Fill / Control: mask, masked image or control latents packed beside the latents.
            return f"FLUX transformer takes {model.config.in_channels} input channels (Fill/Control model)"
        return None
    return f"{kind}: the continuous engine runs UNet2DConditionModel, SD3Transformer2DModel and FluxTransformer2DModel"


def denoiser_for(pipe: Any) -> Denoiser:
    """The family adapter for `pipe` (check `unsupported_reason` first)."""
    from inference_server.continuous.flow import FluxDenoiser, SD3Denoiser
    from inference_server.continuous.unet import SDXLDenoiser, UNetDenoiser

    model, kind = _denoiser(pipe)
    if kind == "UNet2DConditionModel":
        if getattr(model.config, "addition_embed_type", None) == "text_time":
            return SDXLDenoiser(pipe)
        return UNetDenoiser(pipe)
    if kind == "SD3Transformer2DModel":
        return SD3Denoiser(pipe)
    if kind == "FluxTransformer2DModel":
        return FluxDenoiser(pipe)
    raise ValueError(unsupported_reason(pipe) or kind)
