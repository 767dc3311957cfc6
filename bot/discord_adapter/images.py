"""Turn a job's PNGs into the one file a Discord message shows, within the upload limit."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image

# JPEG qualities tried, best first, when a PNG is over the limit: below 60 artefacts get obvious.
JPEG_QUALITIES = (92, 80, 60)
# Each downscale step keeps 3/4 of the width and height (about half the bytes).
DOWNSCALE_STEP = 0.75


def grid(pngs: Sequence[bytes]) -> bytes:
    """One PNG: the image itself for one, else a grid two images wide (2x2 for four)."""
    if len(pngs) == 1:
        return pngs[0]
    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    cols = 2
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (w * cols, h * rows), (0, 0, 0))
    for k, img in enumerate(images):
        sheet.paste(img, ((k % cols) * w, (k // cols) * h))
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


def fit_to_limit(png: bytes, limit: int) -> tuple[bytes, str]:
    """(bytes, file extension) no larger than `limit`: the PNG as is, else re-encoded as an
    optimised PNG, then JPEG, then downscaled JPEG. Raises ValueError if even 16x16 does not fit."""
    if len(png) <= limit:
        return png, "png"
    img = Image.open(io.BytesIO(png))
    img.load()
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    if out.tell() <= limit:
        return out.getvalue(), "png"
    rgb = img.convert("RGB")
    while True:
        for quality in JPEG_QUALITIES:
            out = io.BytesIO()
            rgb.save(out, format="JPEG", quality=quality, optimize=True)
            if out.tell() <= limit:
                return out.getvalue(), "jpg"
        if min(rgb.size) <= 16:
            raise ValueError(f"image cannot be made smaller than {limit} bytes")
        size = (max(16, int(rgb.width * DOWNSCALE_STEP)), max(16, int(rgb.height * DOWNSCALE_STEP)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
