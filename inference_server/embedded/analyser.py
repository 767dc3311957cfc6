"""Read back what a generated image shows: background colour, shape colour and shape kind.

Independent of the model: it only knows the palette and the geometry of the three shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .dataset import COLOURS

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)
# A pixel belongs to the shape when it is this far (RGB distance) from the background colour;
# half of the closest palette pair's distance (yellow/orange, ~80), so anti-aliased edges and
# VAE blur fall on the right side.
FOREGROUND_DISTANCE = 40.0
# Fewer shape pixels than this (~ a 4-pixel-radius disc) means no shape was drawn.
MIN_SHAPE_PIXELS = 40
# Area / (pi * R^2) with R the farthest shape pixel from the centroid: 1.0 for a disc,
# 2/pi = 0.64 for a square, 0.41 for an equilateral triangle; the cuts sit between them.
CIRCLE_MIN_FILL, SQUARE_MIN_FILL = 0.80, 0.51


@dataclass(frozen=True)
class Analysis:
    background: str
    colour: str
    shape: str  # "circle", "square", "triangle" or "none"
    fill: float


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each RGB row."""
    d = ((rgb[..., None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """4-connected largest blob (flood fill; images are only 64x64)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        label += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = label
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


def analyse(image: Image.Image | np.ndarray) -> Analysis:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    border = np.concatenate(
        [
            arr[:2].reshape(-1, 3),
            arr[-2:].reshape(-1, 3),
            arr[:, :2].reshape(-1, 3),
            arr[:, -2:].reshape(-1, 3),
        ]
    )
    bg_rgb = np.median(border, axis=0)
    background = _NAMES[int(nearest_colour(bg_rgb))]
    dist = np.sqrt(((arr - bg_rgb) ** 2).sum(-1))
    rough = _largest_component(dist > FOREGROUND_DISTANCE)
    if rough.sum() < MIN_SHAPE_PIXELS:
        return Analysis(background, "none", "none", 0.0)
    # The shape's own colour from its core (the pixels farthest from the background), then the
    # outline where a pixel is nearer that colour than the background's: the midpoint of a blurred
    # edge, so a soft decoder does not round a triangle into a square.
    core = rough & (dist >= np.percentile(dist[rough], 50))
    fg_rgb = np.median(arr[core], axis=0)
    classes = nearest_colour(arr[core])
    colour = _NAMES[int(np.bincount(classes, minlength=len(_NAMES)).argmax())]
    nearer_fg = ((arr - fg_rgb) ** 2).sum(-1) < ((arr - bg_rgb) ** 2).sum(-1)
    mask = _largest_component(nearer_fg & (dist > FOREGROUND_DISTANCE / 2))
    area = int(mask.sum())
    if area < MIN_SHAPE_PIXELS:
        return Analysis(background, colour, "none", 0.0)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    # +0.5: pixel centres sit half a pixel inside the true outline.
    radius = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2).max() + 0.5
    fill = area / (np.pi * radius**2)
    shape = "circle" if fill >= CIRCLE_MIN_FILL else "square" if fill >= SQUARE_MIN_FILL else "triangle"
    return Analysis(background, colour, shape, float(fill))
