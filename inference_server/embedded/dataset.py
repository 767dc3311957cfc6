"""Procedural training data for the embedded model: one coloured shape on a plain background.

Everything is a pure function of a seed, so the training set, the evaluation prompts and the tests
are reproducible without any download.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
# Drawn at 4x and box-filtered down, so edges are anti-aliased the way a VAE can reproduce them.
SUPERSAMPLE = 4

# Named colours, far enough apart in RGB that the analyser's nearest-colour rule is unambiguous
# (closest pair, yellow/orange, is ~80 apart; per-sample jitter is at most 12 per channel).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 30),
    "orange": (250, 140, 20),
    "purple": (140, 40, 170),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOUR_JITTER = 12
# Small rotations only: the captions carry no orientation, and a 45-degree square reads as a diamond.
MAX_ROTATION_DEG = 20.0
# Size parameter range in pixels (roughly the radius): small shapes under ~8 px lose their outline in
# the 16x16 latent, big ones leave too little background to read its colour.
MIN_SIZE, MAX_SIZE = 9.0, 19.0


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    size: float
    rotation_deg: float
    colour_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]


def _jitter(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in rgb)  # type: ignore[return-value]


def circumradius(shape: str, size: float) -> float:
    """Distance from centre to the farthest point; shapes get similar areas for the same size."""
    if shape == "circle":
        return size
    if shape == "square":
        return size * 0.9 * math.sqrt(2.0)
    if shape == "triangle":
        return size * 1.3
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def sample_spec(
    rng: random.Random, shape: str | None = None, colour: str | None = None, background: str | None = None
) -> ShapeSpec:
    """Draw a random shape description; fixed fields are kept as given."""
    names = list(COLOURS)
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(names)
    if background is None:
        background = rng.choice([c for c in names if c != colour])
    if background == colour:
        raise ValueError(f"background and shape colour are both {colour!r}")
    size = rng.uniform(MIN_SIZE, MAX_SIZE)
    r = circumradius(shape, size)
    margin = r + 2.0
    cx = rng.uniform(margin, IMAGE_SIZE - margin)
    cy = rng.uniform(margin, IMAGE_SIZE - margin)
    rot = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
    return ShapeSpec(
        shape,
        colour,
        background,
        cx,
        cy,
        size,
        rot,
        _jitter(rng, COLOURS[colour]),
        _jitter(rng, COLOURS[background]),
    )


def _polygon(spec: ShapeSpec, corners: int, radius: float, phase_deg: float) -> list[tuple[float, float]]:
    s = SUPERSAMPLE
    pts = []
    for k in range(corners):
        a = math.radians(phase_deg + spec.rotation_deg + 360.0 * k / corners)
        pts.append(((spec.cx + radius * math.cos(a)) * s, (spec.cy + radius * math.sin(a)) * s))
    return pts


def render(spec: ShapeSpec) -> Image.Image:
    """Draw one 64x64 RGB image for a spec."""
    s = SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), spec.background_rgb)
    draw = ImageDraw.Draw(big)
    r = circumradius(spec.shape, spec.size)
    if spec.shape == "circle":
        draw.ellipse(
            ((spec.cx - r) * s, (spec.cy - r) * s, (spec.cx + r) * s, (spec.cy + r) * s), fill=spec.colour_rgb
        )
    elif spec.shape == "square":
        draw.polygon(_polygon(spec, 4, r, 45.0), fill=spec.colour_rgb)
    else:  # triangle, apex up before rotation
        draw.polygon(_polygon(spec, 3, r, -90.0), fill=spec.colour_rgb)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# Caption templates used in training, so natural variants of the prompt work at inference.
# The first one is the canonical form used by the evaluation prompts.
TEMPLATES: tuple[str, ...] = (
    "{a_c} {c} {s} on {a_b} {b} background",
    "{c} {s} on {b} background",
    "{a_b} {b} background with {a_c} {c} {s}",
    "{c} {s}, {b} background",
    "the {c} {s} on the {b} background",
    "{a_c} {c} {s} on {b}",
    "{b} background, {c} {s}",
    "a picture of {a_c} {c} {s} on {a_b} {b} background",
)


def caption(shape: str, colour: str, background: str, template: int = 0) -> str:
    return TEMPLATES[template].format(
        c=colour, s=shape, b=background, a_c=article(colour), a_b=article(background)
    )


def caption_corpus() -> list[str]:
    """Every caption the training can produce (used to learn the tokenizer)."""
    out: list[str] = []
    for s in SHAPES:
        for c in COLOURS:
            for b in COLOURS:
                if b != c:
                    out.extend(caption(s, c, b, t) for t in range(len(TEMPLATES)))
    return out


def make_dataset(seed: int, count: int) -> tuple[np.ndarray, list[ShapeSpec]]:
    """`count` images (uint8, N x 64 x 64 x 3) and their specs; identical for identical seeds."""
    rng = random.Random(seed)
    specs = [sample_spec(rng) for _ in range(count)]
    images = np.stack([np.asarray(render(sp), dtype=np.uint8) for sp in specs])
    return images, specs
