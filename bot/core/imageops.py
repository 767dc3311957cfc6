"""The pixel work of the operations on a result: upscale inputs, zoom-out and pan canvases with their
masks, and the tiles of an upscale too large for the backend.

Pure functions of PNG bytes (Pillow only; the bot core installs no numpy), run in a worker thread.
The backend then gets plain image-to-image and inpainting requests. Sizes are multiples of the
model's size multiple (`multiple`: 8 for SD-family UNets, 16 for SD 3.x and FLUX.1), as its VAE and
patching need them. Masks are white where the backend paints, black where the
original stays.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageChops, ImageFilter

from bot.core.api import BadParameters
from bot.core.params import MAX_ASPECT

Direction = Literal["left", "right", "up", "down"]
DIRECTIONS: tuple[Direction, ...] = ("left", "right", "up", "down")
ZOOM_FACTORS = (1.5, 2.0)
# A pan adds half the image's side in that direction (the original stays whole next to it).
PAN_EXTENT = 0.5
UPSCALE_FACTOR = 2
# Neighbouring tiles of a tiled upscale share this fraction of a tile, blended linearly, so no seam
# shows where two separately denoised tiles meet.
TILE_OVERLAP = 1 / 8


@dataclass(frozen=True)
class Canvas:
    """A job's input: the image (RGB PNG), its mask (PNG, or None for image-to-image), its size,
    and where the original lies in it (left, top, right, bottom) after any scaling."""

    image_png: bytes
    mask_png: bytes | None
    width: int
    height: int
    original_box: tuple[int, int, int, int]


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _open(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png))
    img.load()
    return img.convert("RGB")


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def _fit(width: int, height: int, max_side: int) -> float:
    """The scale that brings (width, height) within `max_side` on both sides (1.0 if it fits)."""
    return min(1.0, max_side / max(width, height))


def upscale_input(png: bytes, *, max_upscale_side: int, multiple: int = 8) -> Canvas:
    """The image resized 2x (Lanczos), the input of the image-to-image pass that adds the detail."""
    img = _open(png)
    width, height = img.width * UPSCALE_FACTOR, img.height * UPSCALE_FACTOR
    if max(width, height) > max_upscale_side:
        raise BadParameters(
            "image",
            f"This image is {img.width}x{img.height}: upscaled it would be {width}x{height}, and the "
            f"largest upscale here is {max_upscale_side} pixels on a side.",
        )
    width, height = _round_to(width, multiple), _round_to(height, multiple)
    big = img.resize((width, height), Image.Resampling.LANCZOS)
    return Canvas(_png(big), None, width, height, (0, 0, width, height))


def outpaint(
    png: bytes, *, left: int, top: int, right: int, bottom: int, max_side: int, multiple: int = 8
) -> Canvas:
    """The image on a larger canvas with `left`/`top`/`right`/`bottom` pixels added around it, and
    the mask of exactly the added border. The border starts as a blurred stretch of the image (so the
    painter continues its colours rather than a flat fill). A canvas larger than `max_side` is scaled
    down as a whole, and its mask is drawn again at the new size, so it still covers the border only."""
    img = _open(png)
    width, height = img.width + left + right, img.height + top + bottom
    if max(width / height, height / width) > MAX_ASPECT:
        raise BadParameters(
            "direction",
            f"That would make a {width}x{height} image, more than {MAX_ASPECT:g} times as wide as "
            "high (or high as wide); pan the other way, or upscale and zoom out instead.",
        )
    scale = _fit(width, height, max_side)
    out_w, out_h = _round_to(width * scale, multiple), _round_to(height * scale, multiple)
    sx, sy = out_w / width, out_h / height
    box = (
        round(left * sx),
        round(top * sy),
        out_w - round(right * sx),
        out_h - round(bottom * sy),
    )
    background = img.resize((out_w, out_h), Image.Resampling.BILINEAR).filter(
        ImageFilter.GaussianBlur(max(out_w, out_h) / 16)
    )
    inner = img.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.LANCZOS)
    background.paste(inner, box[:2])
    mask = Image.new("L", (out_w, out_h), 255)
    mask.paste(0, box)
    return Canvas(_png(background), _png(mask), out_w, out_h, box)


def zoom_out(png: bytes, factor: float, *, max_side: int, multiple: int = 8) -> Canvas:
    """The canvas `factor` times the image's size (1.5x or 2x) with the image in its centre."""
    if factor not in ZOOM_FACTORS:
        raise BadParameters("factor", f"Zoom out by 1.5x or 2x, not {factor!r}.", factor)
    with Image.open(io.BytesIO(png)) as img:
        width, height = img.size
    new_w, new_h = _round_to(width * factor, multiple), _round_to(height * factor, multiple)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return outpaint(
        png,
        left=left,
        top=top,
        right=new_w - width - left,
        bottom=new_h - height - top,
        max_side=max_side,
        multiple=multiple,
    )


def pan(png: bytes, direction: str, *, max_side: int, multiple: int = 8) -> Canvas:
    """The canvas with half the image's side added in `direction`, the image against the far side."""
    if direction not in DIRECTIONS:
        raise BadParameters("direction", f"Pan left, right, up or down, not {direction!r}.", direction)
    with Image.open(io.BytesIO(png)) as img:
        width, height = img.size
    add_w = _round_to(width * PAN_EXTENT, multiple) if direction in ("left", "right") else 0
    add_h = _round_to(height * PAN_EXTENT, multiple) if direction in ("up", "down") else 0
    return outpaint(
        png,
        left=add_w if direction == "left" else 0,
        right=add_w if direction == "right" else 0,
        top=add_h if direction == "up" else 0,
        bottom=add_h if direction == "down" else 0,
        max_side=max_side,
        multiple=multiple,
    )


# -- tiles ------------------------------------------------------------------------------------------


def _spans(length: int, tile_max: int, multiple: int) -> list[tuple[int, int]]:
    """(start, end) of the tiles along one side: as few as fit in `tile_max` with the overlap,
    equal in size (multiples of `multiple`), spread evenly from one end to the other."""
    if length <= tile_max:
        return [(0, length)]
    m = multiple
    overlap = max(2 * m, _round_to(tile_max * TILE_OVERLAP, m))
    count = math.ceil((length - overlap) / (tile_max - overlap))
    size = min(tile_max, _round_to(math.ceil((length + (count - 1) * overlap) / count / m) * m, m))
    starts = [round((length - size) * i / (count - 1) / m) * m for i in range(count)]
    return [(s, s + size) for s in starts]


def tile_boxes(width: int, height: int, tile_max: int, multiple: int = 8) -> list[tuple[int, int, int, int]]:
    """The (left, top, right, bottom) boxes of the tiles covering a width x height image, row by row."""
    rows, cols = _spans(height, tile_max, multiple), _spans(width, tile_max, multiple)
    return [(x0, y0, x1, y1) for (y0, y1) in rows for (x0, x1) in cols]


def crop(png: bytes, box: tuple[int, int, int, int]) -> bytes:
    return _png(_open(png).crop(box))


def _ramp(size: tuple[int, int], width: int, horizontal: bool) -> Image.Image:
    """A mask rising linearly from 0 to 255 over the first `width` pixels, 255 after."""
    w, h = size
    line = Image.new("L", (w if horizontal else 1, 1 if horizontal else h), 255)
    for i in range(min(width, w if horizontal else h)):
        line.putpixel((i, 0) if horizontal else (0, i), round(255 * (i + 1) / (width + 1)))
    return line.resize(size, Image.Resampling.NEAREST)


def blend_tiles(width: int, height: int, tiles: list[tuple[tuple[int, int, int, int], bytes]]) -> bytes:
    """One PNG from tiles given row by row (as `tile_boxes` orders them): each tile is pasted over the
    ones before it through a mask that fades it in across its overlap with its left and upper
    neighbours."""
    canvas = Image.new("RGB", (width, height))
    for (x0, y0, x1, y1), png in tiles:
        tile = _open(png)
        if tile.size != (x1 - x0, y1 - y0):
            tile = tile.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
        mask = Image.new("L", tile.size, 255)
        left_overlap = max(
            (bx1 - x0 for (bx0, by0, bx1, by1), _ in tiles if by0 == y0 and bx0 < x0), default=0
        )
        top_overlap = max((by1 - y0 for (bx0, by0, bx1, by1), _ in tiles if by0 < y0), default=0)
        if left_overlap > 0:
            mask = ImageChops.multiply(mask, _ramp(tile.size, left_overlap, horizontal=True))
        if top_overlap > 0:
            mask = ImageChops.multiply(mask, _ramp(tile.size, top_overlap, horizontal=False))
        canvas.paste(tile, (x0, y0), mask)
    return _png(canvas)
