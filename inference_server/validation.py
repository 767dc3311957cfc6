"""Request parsing: JSON or multipart fields -> a typed `GenerationRequest`, or a `RequestError`.

Every check names the field it rejects, and nothing is silently "fixed": a wrong type, a width that
is not a multiple of 8 or an unknown field is an error, not a guess. Pure functions, no aiohttp.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inference_server.config import ModelConfig, ServerConfig
from inference_server.engine import GenerationRequest, Task
from inference_server.errors import RequestError
from inference_server.images import decode_base64, decode_image
from inference_server.pipelines import SCHEDULERS

__all__ = ["RequestError", "ParsedRequest", "parse_generation", "check_text", "show", "TASKS"]

TASKS: tuple[Task, ...] = ("txt2img", "img2img", "inpaint")
SEED_LIMIT = 2**32  # seeds are uint32 so that every client (JS numbers included) can echo them back
MAX_GUIDANCE = 30.0  # beyond this classifier-free guidance only burns the image

_COMMON = {"prompt", "negative_prompt", "n", "width", "height", "steps", "guidance", "seed", "seeds",
           "scheduler", "stream", "timeout_s", "priority"}  # fmt: skip
# Priorities are small ranks (the bot's fairness order); the bound only keeps them sane integers.
PRIORITY_LIMIT = 1_000_000
_FIELDS: dict[str, set[str]] = {
    "txt2img": _COMMON,
    "img2img": _COMMON | {"image", "strength"},
    "inpaint": _COMMON | {"image", "mask", "strength"},
}


@dataclass(frozen=True)
class ParsedRequest:
    request: GenerationRequest
    stream: bool
    timeout_s: float


def _bad(field: str, message: str) -> RequestError:
    return RequestError(400, "invalid_request", field, message)


class _Fields:
    """Typed access to the body; `from_form` accepts strings for numbers and booleans."""

    def __init__(self, body: Mapping[str, Any], from_form: bool) -> None:
        self.body = body
        self.from_form = from_form

    def has(self, name: str) -> bool:
        return name in self.body and self.body[name] is not None

    def str_(self, name: str) -> str:
        v = self.body[name]
        if not isinstance(v, str):
            raise _bad(name, f"{name} must be a string, got {_type_name(v)}")
        return v

    def text(self, name: str) -> str:
        """A prompt-like string, stripped, checked as `check_text` does."""
        return check_text(name, self.str_(name))

    def int_(self, name: str, lo: int, hi: int) -> int:
        v = self.body[name]
        if self.from_form and isinstance(v, str):
            try:
                v = int(v.strip())
            except ValueError:  # not digits, or more digits than Python converts
                raise _bad(name, f"{name} must be an integer, got {show(v)}") from None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(name, f"{name} must be an integer, got {_type_name(v)}")
        if not lo <= v <= hi:
            raise _bad(name, f"{name} must be between {lo} and {hi}, got {show(v)}")
        return v

    def float_(self, name: str) -> float:
        v = self.body[name]
        if self.from_form and isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise _bad(name, f"{name} must be a number, got {show(v)}") from None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _bad(name, f"{name} must be a number, got {_type_name(v)}")
        try:
            number = float(v)  # an integer beyond the float range overflows here
        except OverflowError:
            raise _bad(
                name, f"{name} must be a finite number, got an integer of {len(str(v))} digits"
            ) from None
        if not math.isfinite(number):
            raise _bad(name, f"{name} must be a finite number")
        return number

    def bool_(self, name: str) -> bool:
        v = self.body[name]
        if self.from_form and isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
            return v.strip().lower() in ("true", "1")
        if not isinstance(v, bool):
            raise _bad(name, f"{name} must be true or false, got {_type_name(v)}")
        return v

    def int_list(self, name: str, lo: int, hi: int) -> list[int]:
        v = self.body[name]
        if self.from_form and isinstance(v, str):
            v = [s for s in v.replace(" ", "").strip("[]").split(",") if s]
            try:
                v = [int(s) for s in v]
            except ValueError:
                raise _bad(name, f"{name} must be a comma-separated list of integers") from None
        if not isinstance(v, list):
            raise _bad(name, f"{name} must be a list of integers, got {_type_name(v)}")
        out = []
        for i, item in enumerate(v):
            if isinstance(item, bool) or not isinstance(item, int):
                raise _bad(name, f"{name}[{i}] must be an integer, got {_type_name(item)}")
            if not lo <= item <= hi:
                raise _bad(name, f"{name}[{i}] must be between {lo} and {hi}, got {show(item)}")
            out.append(item)
        return out


# Values echoed in error messages are cut to this many characters: a client that sends a megabyte
# in a numeric field needn't get it back, and the log line stays readable.
SHOWN_CHARS = 40


def show(value: Any) -> str:
    """`repr(value)` for an error message, shortened past SHOWN_CHARS (ints by digit count)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**SHOWN_CHARS:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def check_text(name: str, value: str) -> str:
    """`value` stripped; 400 naming `name` when it is not valid Unicode text.

    A JSON body can carry a lone UTF-16 surrogate ("\\ud800"): a Python str holds it, but it is no
    character, the tokenizer can't encode it, and in a batched call it would fail everyone else's
    request too. So it is refused here, before the request is queued.
    """
    text = value.strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(
            name,
            f"{name} holds a lone UTF-16 surrogate ({text[e.start]!r} at character {e.start}), "
            "which is not text; send valid Unicode",
        ) from None
    return text


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), type(v).__name__
    )


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
    if not isinstance(body, Mapping):
        raise RequestError(
            400, "invalid_request", None, f"the body must be a JSON object, got {_type_name(body)}"
        )
    files = files or {}
    allowed = _FIELDS[task]
    for name in list(body) + list(files):
        if name not in allowed:
            raise _bad(name, f"unknown field {show(name)} for {task} (allowed: {', '.join(sorted(allowed))})")
    f = _Fields(body, from_form)

    if not f.has("prompt"):
        raise _bad("prompt", "prompt is required")
    prompt = f.text("prompt")
    if not prompt:
        raise _bad("prompt", "prompt must not be empty")
    if len(prompt) > server.max_prompt_chars:
        raise _bad("prompt", f"prompt is {len(prompt)} characters; the limit is {server.max_prompt_chars}")
    negative = f.text("negative_prompt") if f.has("negative_prompt") else ""
    if len(negative) > server.max_prompt_chars:
        raise _bad("negative_prompt", f"negative_prompt is longer than {server.max_prompt_chars} characters")

    n = f.int_("n", 1, server.max_images_per_request) if f.has("n") else None
    seeds: list[int]
    if f.has("seeds"):
        if f.has("seed"):
            raise _bad("seeds", "give either seed or seeds, not both")
        seeds = f.int_list("seeds", 0, SEED_LIMIT - 1)
        if n is None:
            n = len(seeds)
        if not 1 <= len(seeds) <= server.max_images_per_request or len(seeds) != n:
            raise _bad("seeds", f"seeds must list exactly n={n} seeds (1-{server.max_images_per_request})")
    else:
        n = n or 1
        base = f.int_("seed", 0, SEED_LIMIT - 1) if f.has("seed") else secrets.randbelow(SEED_LIMIT)
        seeds = [(base + i) % SEED_LIMIT for i in range(n)]

    steps = f.int_("steps", 1, server.max_steps) if f.has("steps") else min(model.steps, server.max_steps)
    guidance = f.float_("guidance") if f.has("guidance") else model.guidance
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise _bad("guidance", f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {guidance:g}")
    scheduler = f.str_("scheduler").strip().lower() if f.has("scheduler") else model.scheduler
    if scheduler not in SCHEDULERS:
        raise _bad("scheduler", f"unknown scheduler {show(scheduler)} (known: {', '.join(SCHEDULERS)})")
    stream = f.bool_("stream") if f.has("stream") else False
    priority = f.int_("priority", -PRIORITY_LIMIT, PRIORITY_LIMIT) if f.has("priority") else 0
    timeout_s = f.float_("timeout_s") if f.has("timeout_s") else server.default_timeout_s
    if not 0 < timeout_s <= server.max_timeout_s:
        raise _bad("timeout_s", f"timeout_s must be > 0 and <= {server.max_timeout_s:g}")

    width = f.int_("width", server.min_side, server.max_side) if f.has("width") else None
    height = f.int_("height", server.min_side, server.max_side) if f.has("height") else None

    strength: float | None = None
    image = mask = None
    if task in ("img2img", "inpaint"):
        strength = f.float_("strength") if f.has("strength") else model.strength
        if not 0 < strength <= 1:
            raise _bad("strength", f"strength must be > 0 and <= 1, got {strength:g}")
        if int(steps * strength) < 1:
            raise _bad("strength", f"steps x strength must be at least 1 (got {steps} x {strength:g})")
        image = _image_field(f, files, "image", server, "RGB")
        if task == "inpaint":
            mask = _image_field(f, files, "mask", server, "L")
            if mask.size != image.size:
                raise _bad(
                    "mask",
                    f"mask is {mask.size[0]}x{mask.size[1]} but image is {image.size[0]}x{image.size[1]}",
                )
        # An uploaded image sets the output size unless width/height say otherwise.
        width = width if width is not None else _side(image.size[0], "image", "width", server)
        height = height if height is not None else _side(image.size[1], "image", "height", server)
        if image.size != (width, height):
            image = image.resize((width, height), resample=3)  # 3 = BICUBIC
            if mask is not None:
                mask = mask.resize((width, height), resample=0)  # 0 = NEAREST keeps the mask binary
    width = width if width is not None else model.width
    height = height if height is not None else model.height
    for name, value in (("width", width), ("height", height)):
        if value % 8:
            raise _bad(name, f"{name} must be a multiple of 8, got {value}")

    request = GenerationRequest(
        task=task,
        prompt=prompt,
        negative_prompt=negative,
        seeds=tuple(seeds),
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler,
        strength=strength,
        image=image,
        mask=mask,
        priority=priority,
    )
    return ParsedRequest(request=request, stream=stream, timeout_s=timeout_s)


def _side(value: int, field: str, side: str, server: ServerConfig) -> int:
    if value % 8 or not server.min_side <= value <= server.max_side:
        raise _bad(
            field,
            f"{field} {side} is {value}; it must be a multiple of 8 between {server.min_side} and "
            f"{server.max_side} (or pass {side} to resize it)",
        )
    return value


def _image_field(
    f: _Fields, files: Mapping[str, bytes], name: str, server: ServerConfig, mode: str
):  # -> PIL.Image
    """The decoded upload in `mode`: converted here, so that every image reaching a batch is one
    the pipeline can take (a conversion failure is this request's 400, not a batch's 500)."""
    if name in files:
        data = files[name]
    elif f.has(name):
        data = decode_base64(f.str_(name), name)
    else:
        raise _bad(name, f"{name} is required")
    img = decode_image(data, name, max_pixels=server.max_image_pixels)
    try:
        return img.convert(mode)
    except (ValueError, OSError):
        raise _bad(name, f"{name} is a {img.mode} image that can't be converted to {mode}") from None
