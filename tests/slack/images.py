"""Small real images for inpainting tests."""

from __future__ import annotations

import io

from PIL import Image


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def transparent_hole_png(size: int = 64) -> bytes:
    """An opaque image with a transparent square in the middle: the area to repaint."""
    img = Image.new("RGBA", (size, size), (30, 120, 200, 255))
    hole = Image.new("RGBA", (size // 2, size // 2), (0, 0, 0, 0))
    img.paste(hole, (size // 4, size // 4))
    return png(img)


def opaque_png(size: int = 64) -> bytes:
    return png(Image.new("RGB", (size, size), (200, 80, 40)))


def mask_png(size: int = 64) -> bytes:
    img = Image.new("L", (size, size), 0)
    img.paste(255, (0, 0, size // 2, size))
    return png(img)
