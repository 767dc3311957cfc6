"""The result sheet and the upload-limit fitting, on real PNGs."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from bot.discord_adapter.images import fit_to_limit, grid


def noise_png(size: tuple[int, int], seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize(("n", "expected"), [(1, (64, 48)), (2, (128, 48)), (3, (128, 96)), (4, (128, 96))])
def test_grid_is_two_wide(n, expected):
    pngs = [noise_png((64, 48), i) for i in range(n)]
    sheet = grid(pngs)
    assert size_of(sheet) == expected
    if n == 1:
        assert sheet == pngs[0]  # a single image is posted as generated
    else:
        top_right = Image.open(io.BytesIO(sheet)).convert("RGB").crop((64, 0, 128, 48))
        assert top_right.tobytes() == Image.open(io.BytesIO(pngs[1])).convert("RGB").tobytes()


def test_fit_to_limit_keeps_what_fits_and_shrinks_the_rest():
    png = noise_png((256, 256), 1)  # noise: PNG cannot compress it, so JPEG and downscaling must
    same, ext = fit_to_limit(png, len(png))
    assert same is png and ext == "png"
    for limit in (len(png) // 4, len(png) // 40):
        data, ext = fit_to_limit(png, limit)
        assert len(data) <= limit and ext == "jpg"
        assert Image.open(io.BytesIO(data)).format == "JPEG"
    small, _ = fit_to_limit(png, len(png) // 40)
    assert size_of(small)[0] < 256  # had to be downscaled, not just re-encoded
    with pytest.raises(ValueError, match="cannot be made smaller"):
        fit_to_limit(png, 100)
