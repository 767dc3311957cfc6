"""Decoding uploaded images safely and encoding results as PNG."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image

from inference_server.errors import RequestError

# PNG is what we send; JPEG and WebP are what chat platforms and browsers commonly hand over.
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})


def decode_base64(value: str, field: str) -> bytes:
    text = value.strip()
    if text.startswith("data:"):
        # Browsers send data URLs ("data:image/png;base64,...."); accept them as a courtesy.
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid_request", field, f"{field} is not valid base64") from None


def decode_image(data: bytes, field: str, *, max_pixels: int) -> Image.Image:
    """Open, check format and pixel count *before* decoding pixels, then load fully."""
    if not data:
        raise RequestError(400, "invalid_request", field, f"{field} is empty")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; ours is lower and checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise RequestError(413, "payload_too_large", field, f"{field} has too many pixels") from None
    except Exception:
        raise RequestError(400, "invalid_request", field, f"{field} is not a decodable image") from None
    if img.format not in ALLOWED_FORMATS:
        raise RequestError(
            415,
            "unsupported_media_type",
            field,
            f"{field} is {img.format or 'an unknown format'}; send PNG, JPEG or WebP",
        )
    width, height = img.size
    # The header states the size; a small file can claim a huge one (a decompression bomb).
    if width * height > max_pixels:
        raise RequestError(
            413,
            "payload_too_large",
            field,
            f"{field} is {width}x{height} ({width * height} pixels); the limit is {max_pixels} pixels",
        )
    try:
        img.load()
    except Exception:
        raise RequestError(400, "invalid_request", field, f"{field} is truncated or corrupt") from None
    return img


# zlib level 1 instead of PIL's default 6: 4-7x less CPU per image (a 512x512 image: ~19 ms instead
# of ~86 ms; 64x64: 0.3 ms instead of 2 ms) for files ~20-25 % larger. Encoding sits between a batch
# finishing and its clients' next requests arriving, so its cost shows up directly as idle device time.
PNG_COMPRESS_LEVEL = 1


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def png_base64(img: Image.Image) -> str:
    return base64.b64encode(encode_png(img)).decode("ascii")
