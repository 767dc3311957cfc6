"""A `/v1/<task>` body (JSON or multipart) -> a typed `GenerationRequest`, or a `RequestError`.

The fields are checked by the task's pydantic model (`schemas.py`, built for the server's limits and
the loaded model's family); what is left here needs more than one field or the model's defaults
(seeds against n, steps x strength, the output size from an uploaded image, guidance against the
negative prompt) and decoding the uploads. Defaults come from the family (`families.py`), which holds
`[model]`'s own where it sets them. Pure functions, no aiohttp.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from inference_server.config import ServerConfig
from inference_server.engine import GenerationRequest, Task
from inference_server.errors import RequestError
from inference_server.families import DEFAULT_TRUE_CFG, ModelFamily
from inference_server.images import decode_base64, decode_image
from inference_server.limits import SEED_LIMIT
from inference_server.schemas import request_models, show, side_bounds, validate

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
    family: ModelFamily,
    files: Mapping[str, bytes] | None = None,
    from_form: bool = False,
    model: str = "",
    loras: tuple[tuple[str, float], ...] = (),
) -> ParsedRequest:
    """Validate a `/v1/<task>` body. Images come base64 in `body` (JSON) or raw in `files` (multipart).

    `model` and `loras` are the registry's reading of the body's own (`handling.choose_model`), which
    picked `family`; here they go into the request, where they are part of the batch key."""
    if task not in family.tasks:
        raise RequestError(
            400,
            "invalid_request",
            "task",
            f"{family.label} can't do {task} here (diffusers has no {task} pipeline for it); "
            f"it does {', '.join(family.tasks)}",
        )
    schema = request_models(server, family).native[task]

    def unknown(name: str) -> str:
        return unknown_field(name, task, schema.model_fields, family)

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

    steps: int = (
        fields["steps"] if fields["steps"] is not None else min(family.default_steps, server.max_steps)
    )
    width: int | None = fields["width"]
    height: int | None = fields["height"]
    strength: float | None = None
    image = mask = None
    if task in ("img2img", "inpaint"):
        strength = fields["strength"] if fields["strength"] is not None else family.default_strength
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
        width = width if width is not None else _side(image.size[0], "image", "width", server, family)
        height = height if height is not None else _side(image.size[1], "image", "height", server, family)
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
            if mask is not None:
                # NEAREST keeps the mask binary.
                mask = mask.resize((width, height), resample=Image.Resampling.NEAREST)

    guidance: float = fields["guidance"] if fields["guidance"] is not None else family.default_guidance
    problem = family.guidance_problem(guidance, explicit=fields["guidance"] is not None)
    if problem is not None:
        raise _bad("guidance", problem)
    negative_prompt: str = fields["negative_prompt"] or ""
    problem = family.negative_prompt_problem(negative_prompt, guidance)
    if problem is not None:
        raise _bad("negative_prompt", problem)
    true_cfg: float | None = fields.get("true_cfg")
    if true_cfg is None and negative_prompt and family.negative_prompt == "true_cfg":
        true_cfg = DEFAULT_TRUE_CFG  # the negative prompt is honoured, through true CFG
    if true_cfg is not None and true_cfg <= 1:
        true_cfg = None  # 1 = off: the same call as without it (and so the same batch key)

    request = GenerationRequest(
        task=task,
        prompt=fields["prompt"],
        negative_prompt=negative_prompt,
        seeds=tuple(seeds),
        width=width if width is not None else family.default_width,
        height=height if height is not None else family.default_height,
        steps=steps,
        guidance=guidance,
        scheduler=fields["scheduler"] or family.default_sampler,
        strength=strength,
        image=image,
        mask=mask,
        priority=fields["priority"] or 0,
        true_cfg=true_cfg,
        model=model,
        loras=loras,
    )
    timeout_s = fields["timeout_s"] if fields["timeout_s"] is not None else server.default_timeout_s
    return ParsedRequest(request=request, stream=bool(fields["stream"]), timeout_s=timeout_s)


def _side(value: int, field: str, side: str, server: ServerConfig, family: ModelFamily) -> int:
    multiple, lo, hi = side_bounds(server, family)
    if value % multiple or not lo <= value <= hi:
        raise _bad(
            field,
            f"{field} {side} is {value}; for {family.label} it must be a multiple of {multiple} between "
            f"{lo} and {hi} (or pass {side} to resize it)",
        )
    return value


def unknown_field(name: str, task: str, allowed: Mapping[str, Any], family: ModelFamily) -> str:
    """The message for a field the request model doesn't have, saying why where we know."""
    if name == "true_cfg" and family.negative_prompt != "true_cfg":
        return (
            f"true_cfg is for models that take a negative prompt through true classifier-free guidance "
            f"(FLUX.1); {family.label} uses guidance for it"
        )
    return f"unknown field {show(name)} for {task} (allowed: {', '.join(sorted(allowed))})"


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
