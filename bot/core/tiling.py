"""Image-to-image jobs larger than the backend's largest side, made in overlapping tiles.

An upscale of a large image asks for more pixels than one request may (`[bot] max_side`, the
inference server's own limit). The image is cut into the fewest overlapping tiles that fit
(`imageops.tile_boxes`), each tile is one plain image-to-image request with the job's seeds, and the
results are blended back across the overlaps. Progress counts the steps of all tiles; a wait for an
image server (an outage) is reported whichever tile it falls in.
"""

from __future__ import annotations

import asyncio
import dataclasses

from bot.backends.base import BackendEvent, EventCallback, GeneratedImage, GenerationParams, InferenceBackend
from bot.core import imageops


def needs_tiles(params: GenerationParams, max_side: int) -> bool:
    return (
        params.task == "img2img" and params.image is not None and max(params.width, params.height) > max_side
    )


async def generate(
    backend: InferenceBackend,
    params: GenerationParams,
    on_event: EventCallback | None,
    *,
    max_side: int,
    multiple: int = 8,
) -> list[GeneratedImage]:
    """`backend.generate(params)`, in tiles (sides multiples of `multiple`) when the job is larger
    than `max_side`."""
    if not needs_tiles(params, max_side):
        return await backend.generate(params, on_event)
    assert params.image is not None  # needs_tiles checked it
    boxes = imageops.tile_boxes(params.width, params.height, max_side, multiple)
    total = len(boxes) * params.steps
    per_seed: list[list[tuple[tuple[int, int, int, int], bytes]]] = [[] for _ in params.seeds]
    for k, box in enumerate(boxes):
        crop = await asyncio.to_thread(imageops.crop, params.image, box)
        tile = dataclasses.replace(params, image=crop, width=box[2] - box[0], height=box[3] - box[1])

        async def on_tile_event(event: BackendEvent, done: int = k * params.steps) -> None:
            if on_event is None:
                return
            if event.kind == "progress" and event.step is not None:
                await on_event(dataclasses.replace(event, step=done + event.step, total=total))
            elif event.kind == "waiting":
                # Any tile may wait out an outage: the user sees each wait, and the dispatcher
                # stops the job's clock for it (the wait is not the job's run time).
                await on_event(event)
            elif event.kind in ("queued", "started") and done == 0:
                await on_event(event)  # queued/started of the first tile only: the job's own

        images = await backend.generate(tile, on_tile_event)
        if len(images) != params.n:
            return images  # incomplete: the dispatcher fails the job as for any short answer
        for i, image in enumerate(images):
            per_seed[i].append((box, image.png))
    out = []
    for seed, tiles in zip(params.seeds, per_seed, strict=True):
        png = await asyncio.to_thread(imageops.blend_tiles, params.width, params.height, tiles)
        out.append(GeneratedImage(png=png, seed=seed))
    return out
