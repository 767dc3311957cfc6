"""Cheap previews of images while they denoise: a linear projection of the latents to RGB.

A VAE decode per preview would cost about as much as a denoising step on a big model; a per-pixel
linear map from latent channels to RGB costs nothing and shows the composition and colours, which
is all a chat status message needs. The coefficients are ComfyUI's published latent-to-RGB factors
(`comfy/latent_formats.py`) for the VAEs of SD 1.x, SDXL, SD3 and FLUX.1; they act on the latents in
the model's space, `(vae_latents - shift) * scale`. A VAE that is not one of those (the embedded
model's own, the tiny test pipelines' random ones) gets a projection fitted once by least squares
from one decode of random latents (`fit`).

Previews act on VAE-space latents (unscaled, unpacked: what the pipeline hands the decoder), so the
request-level runner and the continuous engine share one function.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Longest side of a preview: enough to see the picture in a chat message, a few KB of PNG.
PREVIEW_MAX_SIDE = 256

# (latent channels, scaling_factor, shift_factor) of the published VAE -> (factors C x 3, bias 3).
# Source: ComfyUI comfy/latent_formats.py (SD15, SDXL, SD3, Flux classes).
_PUBLISHED: dict[tuple[int, float, float], tuple[list[list[float]], list[float]]] = {
    (4, 0.18215, 0.0): (  # SD 1.x / 2.x
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        [0.0, 0.0, 0.0],
    ),
    (4, 0.13025, 0.0): (  # SDXL
        [
            [0.3651, 0.4232, 0.4341],
            [-0.2533, -0.0042, 0.1068],
            [0.1076, 0.1111, -0.0362],
            [-0.3165, -0.2492, -0.2188],
        ],
        [0.1084, -0.0175, -0.0011],
    ),
    (16, 1.5305, 0.0609): (  # SD3
        [
            [-0.0922, -0.0175, 0.0749],
            [0.0311, 0.0633, 0.0954],
            [0.1994, 0.0927, 0.0458],
            [0.0856, 0.0339, 0.0902],
            [0.0587, 0.0272, -0.0496],
            [-0.0006, 0.1104, 0.0309],
            [0.0978, 0.0306, 0.0427],
            [-0.0042, 0.1038, 0.1358],
            [-0.0194, 0.0020, 0.0669],
            [-0.0488, 0.0130, -0.0268],
            [0.0922, 0.0988, 0.0951],
            [-0.0278, 0.0524, -0.0542],
            [0.0332, 0.0456, 0.0895],
            [-0.0069, -0.0030, -0.0810],
            [-0.0596, -0.0465, -0.0293],
            [-0.1448, -0.1463, -0.1189],
        ],
        [0.2394, 0.2135, 0.1925],
    ),
    (16, 0.3611, 0.1159): (  # FLUX.1
        [
            [-0.0346, 0.0244, 0.0681],
            [0.0034, 0.0210, 0.0687],
            [0.0275, -0.0668, -0.0433],
            [-0.0174, 0.0160, 0.0617],
            [0.0859, 0.0721, 0.0329],
            [0.0004, 0.0383, 0.0115],
            [0.0405, 0.0861, 0.0915],
            [-0.0236, -0.0185, -0.0259],
            [-0.0245, 0.0250, 0.1180],
            [0.1008, 0.0755, -0.0421],
            [-0.0515, 0.0201, 0.0011],
            [0.0428, -0.0012, -0.0036],
            [0.0817, 0.0765, 0.0749],
            [-0.1264, -0.0522, -0.1103],
            [-0.0280, -0.0881, -0.0499],
            [-0.1262, -0.0982, -0.0778],
        ],
        [-0.0329, -0.0718, -0.0851],
    ),
}


@dataclass(frozen=True)
class Previewer:
    """VAE-space latents (B, C, h, w) -> one small PNG per image, by `rgb = latents @ weight + bias`
    (RGB in [-1, 1])."""

    weight: Any  # torch.Tensor (C, 3), VAE space
    bias: Any  # torch.Tensor (3,)
    source: str  # "published" or "fitted": which projection (logged at load)
    # Image pixels per latent pixel (the VAE's downsampling: 8 for every published family).
    latent_scale: int = 8

    def pngs(self, latents: Any) -> list[bytes]:
        import torch
        from PIL import Image

        with torch.no_grad():
            x = latents.detach().to("cpu", torch.float32)
            rgb = torch.einsum("bchw,cr->bhwr", x, self.weight) + self.bias
            pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        out = []
        for array in pixels:
            img = Image.fromarray(array, "RGB")
            h, w = array.shape[:2]
            # Latents are 1/latent_scale of the image's side (FLUX's once unpacked): scale up to a viewable
            # size, keeping the shape, but never past the image itself (a 64 px image gets a 64 px
            # preview: encoding is most of the cost, and more pixels show nothing more).
            scale = min(PREVIEW_MAX_SIDE, self.latent_scale * max(h, w)) / max(h, w)
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            # Fastest zlib level: the encode is most of a preview's cost (noisy early latents
            # compress badly); the bytes matter less than the time on the device thread.
            img.save(buf, format="PNG", compress_level=1)
            out.append(buf.getvalue())
        return out


def previewer_for(vae: Any) -> Previewer:
    """The projection for this VAE: the published one when the VAE is a published one (same latent
    channels, scaling and shift factors), else one fitted from a decode."""
    import torch

    cfg = vae.config
    channels = int(cfg.latent_channels)
    scale = float(cfg.scaling_factor)
    shift = float(getattr(cfg, "shift_factor", None) or 0.0)
    for (c, s, sh), (factors, bias) in _PUBLISHED.items():
        if c == channels and abs(s - scale) < 1e-4 and abs(sh - shift) < 1e-4:
            f = torch.tensor(factors, dtype=torch.float32)
            b = torch.tensor(bias, dtype=torch.float32)
            # model = (vae - shift) * scale, so rgb = vae @ (scale f) + (b - shift scale sum_c f).
            return Previewer(
                weight=f * scale,
                bias=b - shift * scale * f.sum(0),
                source="published",
                latent_scale=latent_scale(vae),
            )
    return fit(vae)


def latent_scale(vae: Any) -> int:
    # diffusers' own vae_scale_factor: one 2x downsampling between each pair of encoder blocks.
    return int(2 ** (len(vae.config.block_out_channels) - 1))


def fit(vae: Any, *, side: int = 16, samples: int = 4, seed: int = 0) -> Previewer:
    """Least-squares projection from one decode of random latents: each latent pixel against the mean
    colour of the image patch it decodes to."""
    import torch
    import torch.nn.functional as F

    cfg = vae.config
    channels = int(cfg.latent_channels)
    scale = float(cfg.scaling_factor)
    shift = float(getattr(cfg, "shift_factor", None) or 0.0)
    generator = torch.Generator("cpu").manual_seed(seed)
    # Random latents of the spread the denoiser produces (unit variance in model space).
    model_space = torch.randn((samples, channels, side, side), generator=generator)
    latents = model_space / scale + shift
    param = next(vae.parameters())
    with torch.no_grad():
        images = vae.decode(latents.to(param.device, param.dtype), return_dict=False)[0]
    images = images.to("cpu", torch.float32)
    patches = F.adaptive_avg_pool2d(images, (side, side))  # (B, 3, side, side)
    x = latents.permute(0, 2, 3, 1).reshape(-1, channels)
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    y = patches.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x1, y).solution  # (C + 1, 3)
    return Previewer(
        weight=solution[:-1].contiguous(),
        bias=solution[-1].contiguous(),
        source="fitted",
        latent_scale=latent_scale(vae),
    )


def due(step: int, total: int, every: int) -> bool:
    """Whether a preview is due after `step` of `total`: every `every` steps, never after the last
    (the result itself follows at once)."""
    return every > 0 and step < total and step % every == 0


def safe_pngs(previewer: Previewer | None, latents: Any) -> list[bytes] | None:
    """`previewer.pngs(latents)`, or None (logged) if it fails: a preview never fails a request."""
    if previewer is None:
        return None
    try:
        return previewer.pngs(latents)
    except Exception:
        log.warning("making a preview failed; skipping it", exc_info=True)
        return None


def pipeline_latents_to_vae(pipe: Any, latents: Any, height: int, width: int) -> Any:
    """A diffusers pipeline's in-loop latents (model space; FLUX's packed into 2x2 tokens) as the
    VAE's decoder takes them."""
    if latents.ndim == 3:  # FLUX: (B, tokens, C*4)
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    cfg = pipe.vae.config
    return latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
