"""Images users upload (to inpaint, or to start an image-to-image job from): checked, decoded, and
fitted to the model's size.

Runs in a worker thread (decoding and resizing are CPU work); every refusal is `BadParameters`
naming the field ("image" or "mask").
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from bot.core.api import BadParameters
from bot.core.params import MAX_ASPECT, Limits, size_for_aspect

# Decompression-bomb guard: inputs are resized to about the model's default size anyway.
MAX_INPUT_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class InpaintInputs:
    """The image (RGB PNG) and mask (PNG, white = repaint) at the job's size."""

    image_png: bytes
    mask_png: bytes
    width: int
    height: int


def decode(data: bytes, field: str, *, max_bytes: int) -> Image.Image:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadParameters(field, f"The {field} must be image bytes, got {type(data).__name__}.")
    if not data:
        raise BadParameters(field, f"The {field} is empty.")
    if len(data) > max_bytes:
        raise BadParameters(
            field,
            f"The {field} is {len(data) / 1048576:.1f} MiB; at most {max_bytes / 1048576:.0f} MiB.",
        )
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_INPUT_PIXELS:
            raise BadParameters(field, f"The {field} is {img.width}x{img.height}; at most 4096x4096.")
        if img.format not in ("PNG", "JPEG", "WEBP"):
            raise BadParameters(field, f"The {field} must be PNG, JPEG or WebP, got {img.format}.")
        img.load()
    except BadParameters:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadParameters(field, f"The {field} is not a readable PNG, JPEG or WebP image.") from None
    return img


@dataclass(frozen=True)
class StartImage:
    """An uploaded starting image (RGB PNG) at the job's size."""

    image_png: bytes
    width: int
    height: int


def prepare_start_image(image: bytes, *, max_bytes: int, limits: Limits) -> StartImage:
    """The image to start an image-to-image job from, resized to about the model's default pixel
    count at its aspect ratio (transparent parts on white: the model sees no alpha)."""
    img = decode(image, "image", max_bytes=max_bytes)
    w, h = img.size
    if max(w / h, h / w) > MAX_ASPECT:
        raise BadParameters("image", f"The image is {w}x{h}; its sides must be within 4:1 of each other.")
    rgba = img.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    width, height = size_for_aspect(w, h, limits)
    rgb = flat.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    return StartImage(_png(rgb), width, height)


def prepare_inpaint(image: bytes, mask: bytes | None, *, max_bytes: int, limits: Limits) -> InpaintInputs:
    """The image and its mask, or the mask its transparent pixels make when none is given, resized
    to about the model's default pixel count at the image's aspect ratio (`size_for_aspect`)."""
    img = decode(image, "image", max_bytes=max_bytes)
    w, h = img.size
    if max(w / h, h / w) > MAX_ASPECT:
        raise BadParameters("image", f"The image is {w}x{h}; its sides must be within 4:1 of each other.")
    if mask is None:
        has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        if not has_alpha:
            raise BadParameters(
                "mask",
                "Give a mask, or an image whose transparent pixels mark the area to repaint "
                "(this image has no transparency).",
            )
        alpha = img.convert("RGBA").getchannel("A")
        mask_img = alpha.point(lambda a: 255 if a < 128 else 0)
    else:
        m = decode(mask, "mask", max_bytes=max_bytes)
        if m.size != img.size:
            raise BadParameters(
                "mask",
                f"The mask is {m.width}x{m.height} but the image is {w}x{h}; they must be the same size.",
            )
        mask_img = m.convert("L").point(lambda v: 255 if v >= 128 else 0)
    if mask_img.getextrema()[1] == 0:
        raise BadParameters("mask", "The mask is empty: nothing is marked to repaint (white = repaint).")
    width, height = size_for_aspect(w, h, limits)
    rgb = img.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    mask_small = mask_img.resize((width, height), Image.Resampling.NEAREST)
    return InpaintInputs(_png(rgb), _png(mask_small), width, height)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
