"""A `/v1/<task>` body (JSON or multipart) -> a typed `GenerationRequest`, or a `RequestError`.

The fields are checked by the task's pydantic model (`schemas.py`); what is left here needs more than
one field or the model's defaults (seeds against n, steps x strength, the output size from an uploaded
image) and decoding the uploads. Pure functions, no aiohttp.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from inference_server.config import ModelConfig, ServerConfig
from inference_server.engine import GenerationRequest, Task
from inference_server.errors import RequestError
from inference_server.images import decode_base64, decode_image
from inference_server.limits import SEED_LIMIT
from inference_server.schemas import request_models, show, validate

__all__ = ["ParsedRequest", "parse_generation", "decode_upload"]


@dataclass(frozen=True)
class ParsedRequest:
    request: GenerationRequest
    stream: bool
    timeout_s: float


def _bad(field: str, message: str) -> RequestError:
    return RequestError(400, "invalid_request", field, message)


def parse_generation(
    task: Task,
    body: Mapping[str, Any],
    *,
    server: ServerConfig,
    model: ModelConfig,
    files: Mapping[str, bytes] | None = None,
    from_form: bool = False,
) -> ParsedRequest:
    """Validate a `/v1/<task>` body. Images come base64 in `body` (JSON) or raw in `files` (multipart)."""
    schema = request_models(server).native[task]

    def unknown(name: str) -> str:
        allowed = ", ".join(sorted(schema.model_fields))
        return f"unknown field {show(name)} for {task} (allowed: {allowed})"

    fields = validate(schema, {**body, **(files or {})}, from_form=from_form, unknown=unknown)

    n: int | None = fields["n"]
    seeds: list[int]
    if fields["seeds"] is not None:
        if fields["seed"] is not None:
            raise _bad("seeds", "give either seed or seeds, not both")
        seeds = fields["seeds"]
        n = len(seeds) if n is None else n
        if not 1 <= len(seeds) <= server.max_images_per_request or len(seeds) != n:
            raise _bad("seeds", f"seeds must list exactly n={n} seeds (1-{server.max_images_per_request})")
    else:
        n = n or 1
        base = fields["seed"] if fields["seed"] is not None else secrets.randbelow(SEED_LIMIT)
        seeds = [(base + i) % SEED_LIMIT for i in range(n)]

    steps: int = fields["steps"] if fields["steps"] is not None else min(model.steps, server.max_steps)
    width: int | None = fields["width"]
    height: int | None = fields["height"]
    strength: float | None = None
    image = mask = None
    if task in ("img2img", "inpaint"):
        strength = fields["strength"] if fields["strength"] is not None else model.strength
        if int(steps * strength) < 1:
            raise _bad("strength", f"steps x strength must be at least 1 (got {steps} x {strength:g})")
        image = decode_upload(fields["image"], "image", server, "RGB")
        if task == "inpaint":
            mask = decode_upload(fields["mask"], "mask", server, "L")
            if mask.size != image.size:
                raise _bad(
                    "mask",
                    f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x{image.size[1]}",
                )
        # An uploaded image sets the output size unless width/height say otherwise.
        width = width if width is not None else _side(image.size[0], "image", "width", server)
        height = height if height is not None else _side(image.size[1], "image", "height", server)
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
            if mask is not None:
                # NEAREST keeps the mask binary.
                mask = mask.resize((width, height), resample=Image.Resampling.NEAREST)

    request = GenerationRequest(
        task=task,
        prompt=fields["prompt"],
        negative_prompt=fields["negative_prompt"] or "",
        seeds=tuple(seeds),
        width=width if width is not None else model.width,
        height=height if height is not None else model.height,
        steps=steps,
        guidance=fields["guidance"] if fields["guidance"] is not None else model.guidance,
        scheduler=fields["scheduler"] or model.scheduler,
        strength=strength,
        image=image,
        mask=mask,
        priority=fields["priority"] or 0,
    )
    timeout_s = fields["timeout_s"] if fields["timeout_s"] is not None else server.default_timeout_s
    return ParsedRequest(request=request, stream=bool(fields["stream"]), timeout_s=timeout_s)


def _side(value: int, field: str, side: str, server: ServerConfig) -> int:
    if value % 8 or not server.min_side <= value <= server.max_side:
        raise _bad(
            field,
            f"{field} {side} is {value}; it must be a multiple of 8 between {server.min_side} and "
            f"{server.max_side} (or pass {side} to resize it)",
        )
    return value


def decode_upload(data: str | bytes | None, name: str, server: ServerConfig, mode: str) -> Image.Image:
    """An upload (raw bytes from a file part, or base64 text) decoded and converted to `mode` here,
    so that every image reaching a batch is one the pipeline can take (a conversion failure is this
    request's 400, not a batch's 500)."""
    if data is None:
        raise _bad(name, f"{name} is required")
    raw = decode_base64(data, name) if isinstance(data, str) else data
    img = decode_image(raw, name, max_pixels=server.max_image_pixels)
    try:
        return img.convert(mode)
    except (ValueError, OSError):
        raise _bad(name, f"{name} is a {img.mode} image that can't be converted to {mode}") from None
